"""The Dockerfile parses (Docker's own parser, from the `dockerfile` package) and has the targets the README
documents: a CPU image that installs the pinned CPU torch before megamoe and runs the demo, and a CUDA image."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_dockerfile_targets():
    dockerfile = pytest.importorskip("dockerfile")
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages = {}
    for c in commands:
        if c.cmd == "FROM":
            current = stages.setdefault(c.value[-1], [])
        elif c.cmd != "ARG" or stages:
            current.append(c)
    assert sorted(stages) == ["cpu", "cuda"]
    cpu = [c.original for c in stages["cpu"]]
    torch_at = next(i for i, line in enumerate(cpu) if "--index-url" in line and "${TORCH}" in line)
    megamoe_at = next(i for i, line in enumerate(cpu) if "pip install -e" in line)
    assert torch_at < megamoe_at
    assert cpu[-1] == 'CMD ["bash", "examples/mixtral/train_tiny_cpu.sh"]'
    assert (ROOT / "examples/mixtral/train_tiny_cpu.sh").is_file()
    assert any('".[logging,gpu]"' in c.original for c in stages["cuda"])
    for stage in stages.values():  # every COPY source exists in the build context
        for c in stage:
            if c.cmd == "COPY":
                assert all((ROOT / src).exists() for src in c.value[:-1]), c.original
