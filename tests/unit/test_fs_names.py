"""``plain_name``: the one check before ckptd writes, deletes or uploads a name in a folder."""

from __future__ import annotations

import pytest

from ckptd.fs.names import plain_name


@pytest.mark.parametrize("name", ["best_acc_epoch_3.pth", ".hidden", "a..b", "-", "checkpoint-10"])
def test_plain_names(name: str) -> None:
    assert plain_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "../up", "nul\0byte", None, 3])
def test_names_that_could_leave_the_folder_or_are_no_names(name: object) -> None:
    assert not plain_name(name)
