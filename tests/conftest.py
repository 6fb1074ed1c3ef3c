import os
import time

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")

import h5py  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from widthkit.inputs.checkpoints import save_checkpoint  # noqa: E402
from widthkit.inputs.data import load_dataset  # noqa: E402
from widthkit.models import create_model  # noqa: E402


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


def wait_for_done(path, group, n, proc, timeout=180.0) -> int:
    """Poll an analysis file until ``group`` has ``n`` finished points (or ``proc`` ended); returns the count."""
    deadline, n_done = time.time() + timeout, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with h5py.File(path, "r", locking=False) as f:
                n_done = int(f[group]["done"][...].sum())
        except (OSError, KeyError):  # not created yet
            n_done = 0
        if n_done >= n:
            break
        time.sleep(0.05)
    return n_done
