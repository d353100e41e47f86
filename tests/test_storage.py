"""Generated files: random names, whole writes, path guard, retention by age and count."""

from __future__ import annotations

import os
import time

from server.storage import ImageStore


def test_names_are_random_and_files_whole(tmp_path):
    store = ImageStore(tmp_path, retention_seconds=60, max_files=10)
    names = {store.save(b"data", "png") for _ in range(5)}
    assert len(names) == 5
    assert all(len(name.split(".")[0]) >= 22 for name in names)  # 16 random bytes = 128 bits
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no .partial left behind
    assert all(store.path_of(name).read_bytes() == b"data" for name in names)


def test_path_guard(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    store = ImageStore(tmp_path / "store", retention_seconds=60, max_files=10)
    for name in ["../secret.png", "..%2Fsecret.png", "/etc/passwd", "", ".", "a" * 22 + ".png"]:
        assert store.path_of(name) is None


def test_retention_by_age_and_count(tmp_path):
    store = ImageStore(tmp_path, retention_seconds=100, max_files=3)
    old = store.save(b"old", "png")
    past = time.time() - 200
    os.utime(tmp_path / old, (past, past))
    assert store.path_of(old) is None  # expired: not served even before pruning
    names = [store.save(bytes([i]), "png") for i in range(4)]
    assert not (tmp_path / old).exists()
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == 3 and names[0] not in kept
