import os
import signal
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")
# One thread per process (children inherit it) unless the caller says otherwise: the tiny test models are as
# fast on one, a busy machine cannot slow the suite down many times over (idle OpenMP threads spinning against
# other processes), and every process of a test does the same arithmetic. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from widthkit.inputs.checkpoints import save_checkpoint  # noqa: E402
from widthkit.inputs.data import load_dataset  # noqa: E402
from widthkit.models import create_model  # noqa: E402


# --------------------------------------------------------------------------------------------------------
# The tolerance policy: a result computed on CUDA (or any device) at a precision, against the fp32 CPU reference
# of the same computation (same model, weights, data, batches). One table for every test; README "Tests on a GPU".
#
# - forward (rtol, atol): outputs, losses and normalised inputs of forward passes, elementwise. fp32: the same
#   float32 math with other kernels and summation orders, a few ulps (float32 eps 1.2e-7) grown through a deep
#   net's layers (1.5e-7 seen on normalised pixels, issue 19); tf32 rounds matmul and convolution inputs to a
#   10-bit mantissa (~5e-4 each); bf16 autocast to an 8-bit mantissa (~4e-3 each; on an H200 losses moved 2-8e-5
#   relative on 60,000 images, a CPU ResNet-20 up to 3e-3, single outputs more).
# - derivative: gradients, Hessian-vector products, one optimiser step's update: ‖a - b‖ / ‖b‖ of the vectors
#   (second derivatives lose more digits to cancellation than a forward pass).
# - flips: predictions allowed to change (argmax near-ties), as a fraction of the examples, plus one.
# --------------------------------------------------------------------------------------------------------
TOLERANCE = {
    "fp32": {"rtol": 1e-5, "atol": 1e-6, "derivative": 1e-4, "flips": 0.0},
    "tf32": {"rtol": 5e-3, "atol": 1e-4, "derivative": 2e-2, "flips": 0.01},
    "bf16": {"rtol": 2e-2, "atol": 1e-3, "derivative": 5e-2, "flips": 0.02},
}


def assert_forward_close(actual, expected, precision, what=""):
    """Forward-pass results (tensors or arrays) within the policy's (rtol, atol) of the fp32 CPU reference."""
    import numpy as np

    tol = TOLERANCE[precision]
    a = actual.detach().cpu().double().numpy() if torch.is_tensor(actual) else np.asarray(actual, dtype=np.float64)
    e = expected.detach().cpu().double().numpy() if torch.is_tensor(expected) else np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(a, e, rtol=tol["rtol"], atol=tol["atol"], err_msg=f"{what} ({precision} policy)")


def assert_derivative_close(actual, expected, precision, what=""):
    """A derivative vector within the policy's norm-relative error of the fp32 CPU reference."""
    a, e = actual.detach().cpu().double().flatten(), expected.detach().cpu().double().flatten()
    err = float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e))
    assert err <= TOLERANCE[precision]["derivative"], f"{what}: relative error {err:.2e} ({precision} policy)"


def allowed_flips(precision, n):
    """Predictions out of ``n`` that may differ from the reference's at ``precision``."""
    return 1 + int(TOLERANCE[precision]["flips"] * n)


def train_digits(seed, epochs, arch="digits_cnn"):
    """A plain SGD loop on the digits training split: a real (if short) training run, in about a second."""
    tr = load_dataset("digits", split="train")
    x, y = tr.normalized(), tr.labels
    torch.manual_seed(seed)
    m = create_model(arch, num_classes=10)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        m.train()
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return m.eval()


@pytest.fixture(scope="session")
def digits_ckpts(tmp_path_factory):
    """start/sgd/swa digits_cnn checkpoints (widthkit format) and a digits_mlp one: {role: path}."""
    d = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for role, seed, epochs in (("start", 0, 1), ("sgd", 1, 2), ("swa", 2, 2)):
        paths[role] = str(d / f"{role}.pt")
        save_checkpoint(paths[role], train_digits(seed, epochs), arch="digits_cnn", num_classes=10,
                        dataset="digits", role=role, config={"weight_decay": 5e-4})
    paths["mlp"] = str(d / "mlp.pt")
    save_checkpoint(paths["mlp"], train_digits(3, 1, "digits_mlp"), arch="digits_mlp", num_classes=10,
                    dataset="digits")
    return paths



# --------------------------------------------------------------------------------------------------------
# Children that stop at a known point: kill / resume tests without races
#
# A child is a small Python script running the same library call as the command under test, with a hook (a
# progress callback, a wrapped train_epoch) that at a chosen point writes a marker file holding its pid and
# then blocks. The test waits for the marker (no deadline of its own: pytest-timeout bounds the test), so when
# it sends SIGKILL the child is certainly alive and has done exactly that much work.
# --------------------------------------------------------------------------------------------------------

STOP_HERE = '''
import os, sys, time


def stop_here(marker):
    """Tell the test that this process reached its stop point (the marker appears whole, holding the pid),
    then wait to be killed."""
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, marker)
    while True:
        time.sleep(3600)
'''

ANALYSIS_CHILD = STOP_HERE + '''
# argv: MARKER N MODULE ARGS...: `python -m MODULE ARGS...` (an analysis command), except that the writing
# process stops in its progress callback as soon as N points are in the file (marker MARKER.0); under torchrun
# every other rank stops just before it evaluates its second chunk (marker MARKER.<rank>)
import importlib

from widthkit import cli
from widthkit.engine.evaluator import Evaluator

marker, n, module, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
rank = int(os.environ.get("RANK", "0"))


def progress(done, total):  # on the writer only: after every chunk written to the file
    if done >= n:
        stop_here(f"{marker}.{rank}")


cli.progress_bar = lambda enabled, desc: (progress, lambda: None)
if rank > 0:
    real, calls = Evaluator.evaluate, []

    def evaluate(self, *a, **kw):  # one call per chunk this rank takes
        calls.append(1)
        if len(calls) == 2:
            stop_here(f"{marker}.{rank}")
        return real(self, *a, **kw)

    Evaluator.evaluate = evaluate
sys.exit(importlib.import_module(module).main(args))
'''

TRAIN_CHILD = STOP_HERE + '''
# argv: MARKER EPOCH STEP ARGS...: `python -m widthkit.train ARGS...`, except that it stops after STEP SGD
# steps of the EPOCH-th epoch it trains (counting every call of trainer.train_epoch, in every phase)
from widthkit.training import trainer
from widthkit.train import main

marker, epoch, step, args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
real, epochs = trainer.train_epoch, []


def train_epoch(*a, on_batch=None, **kw):
    epochs.append(1)
    steps = []

    def counted():
        if on_batch is not None:
            on_batch()
        steps.append(1)
        if len(epochs) == epoch and len(steps) == step:
            stop_here(marker)

    return real(*a, on_batch=counted, **kw)


trainer.train_epoch = train_epoch
sys.exit(main(args))
'''


def python_child(code, *args) -> list[str]:
    """The argv of ``python -c code args...``."""
    return [sys.executable, "-c", code, *map(str, args)]


def wait_for_marker(marker, proc, log=None) -> int:
    """Wait until the child ``proc`` wrote ``marker`` and return the pid in it; fail, showing the child's log,
    if the child ended first. No deadline here: pytest-timeout bounds the test."""
    marker = str(marker)
    while not os.path.exists(marker):
        if proc.poll() is not None:
            text = open(log, errors="replace").read()[-3000:] if log and os.path.exists(log) else ""
            pytest.fail(f"the child ended (exit code {proc.returncode}) before it reached its stop point:\n{text}")
        time.sleep(0.02)
    with open(marker) as f:
        return int(f.read())


def kill9(proc) -> None:
    """A real ``kill -9`` of a child that is blocked at its stop point, and its exit collected."""
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.fixture
def spawn(tmp_path):
    """``spawn(argv, **popen_kwargs) -> (proc, log)``: a child writing stdout and stderr to a log file (a pipe
    nobody reads could fill up and stall it). Whatever still runs when the test ends (after a failure) is
    stopped: SIGTERM first (torchrun passes it on to its workers), then SIGKILL to its process group."""
    procs = []

    def start(argv, **kwargs):
        log = tmp_path / f"child{len(procs)}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and bit-reproducibly across processes) on one thread; the caller's count is
    restored after the module. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------------
# Real small and read-only filesystems (root mounts a tmpfs; tests are skipped where mounting is not allowed)
# --------------------------------------------------------------------------------------------------------


def mount_tmpfs(folder, options: str):
    """Mount a real tmpfs with ``options`` on ``folder`` for the duration of a test (skipped where mounting is
    not allowed), then unmount it."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip(f"needs root to mount a tmpfs ({options})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 5 MiB filesystem."""
    yield from mount_tmpfs(tmp_path / "small", "size=5m")


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only filesystem (a tmpfs mounted ro): even root cannot write there."""
    yield from mount_tmpfs(tmp_path / "ro", "ro,size=1m")


def fill_disk(folder, leave: int) -> None:
    """Fill the filesystem of ``folder`` (with the file ``folder/filler``) until about ``leave`` bytes are free
    (0: completely full)."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    if leave <= 0:
        return
    st = os.statvfs(folder)
    os.truncate(filler, max(0, filler.stat().st_size - (leave - st.f_bavail * st.f_frsize)))
