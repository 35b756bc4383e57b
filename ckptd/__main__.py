from ckptd.cli.commands import main

raise SystemExit(main())
