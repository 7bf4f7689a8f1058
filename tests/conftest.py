import inspect
import os
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

# A kernel test's devices: the CPU through Triton's interpreter, and the GPU where there is one.
KERNEL_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    from kvdrive.models.loader import load_model

    return load_model("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gemma3():
    from kvdrive.models.loader import load_model

    return load_model("gemma3", device="cpu", dtype="float32")


def run_interpreted(test_file: str, func: str, *args) -> None:
    """Call ``func(*args)`` of the test module at ``test_file`` in a fresh process with TRITON_INTERPRET=1
    (Triton's kernels run on the CPU). A fresh process because Triton reads the variable when
    it is imported, and its own library functions (``tl.sort``) are bound then."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(TESTS)!r})
        spec = importlib.util.spec_from_file_location("t", {str(Path(test_file).resolve())!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        m.{func}(*{args!r})
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=root, check=False
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def check_kernel(check, device: str) -> None:
    """Run a kernel test's ``check(device)``: on "cpu" in a fresh process under Triton's
    interpreter (``run_interpreted``), on "cuda" here, compiled."""
    if device == "cpu":
        pytest.importorskip("triton")
        run_interpreted(inspect.getfile(check), check.__name__, "cpu")
    else:
        check(device)


@pytest.fixture
def interpret():
    """Triton kernels imported inside the test run under the interpreter (on CPU). Kernel
    modules are imported lazily by their launchers, so the first import sees this."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _forget_kernel_modules()  # imported compiled by an earlier test (test_kernels_compile)
    yield
    _forget_kernel_modules()  # interpreted kernels must not reach later GPU-mode imports
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


def _forget_kernel_modules() -> None:
    import sys

    for name in [n for n in sys.modules if n.startswith("kvdrive.") and n.endswith(("_kernel", "_kernels", "_triton"))]:
        del sys.modules[name]
        parent, _, child = name.rpartition(".")
        if hasattr(sys.modules.get(parent), child):  # ``from package import module`` reads this
            delattr(sys.modules[parent], child)
