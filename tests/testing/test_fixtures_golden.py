"""Golden bytes of the fixture writer: the streaming safetensors writer and the seeded weights must
give the same files as they did when the checkpoints of the tests and benchmarks were first made
(hashes taken from the writer before the safetensors layer was unified)."""

import hashlib

import pytest

from sd_scripts_lorax.testing.fixtures import write_fixture

GOLDEN = {
    "sd15": "9e0ff587513c693478e8d73ac966a6cc4858ece920f10057e2e1f94d765de883",
    "sdxl": "960b507f95178cea9861dc9247db8ca3914d29cc49d672f0ffbed70a274b10db",
}


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_tiny_single_file_bytes_are_golden(tmp_path, family):
    path = write_fixture(family, "single_file", "tiny", 3, tmp_path / f"{family}.safetensors")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == GOLDEN[family]
