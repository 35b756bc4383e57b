"""One reconcile pass over a work_dir: discover, observe, plan, write artifacts, delete, save."""
