"""The fixed few-shot class-incremental session lists of TOPIC and CEC.

Tao et al., "Few-Shot Class-Incremental Learning" (TOPIC, CVPR 2020) fixed the classes and shots
of the CIFAR-100, mini-ImageNet and CUB-200-2011 protocols; Zhang et al., "Few-Shot Incremental
Learning with Continually Evolved Classifiers" (CEC, CVPR 2021) ship those lists as
``data/index_list/<dataset>/session_<t>.txt`` (icoz69/CEC-CVPR2021, MIT licence), and they are the
lists behind the published FSCIL numbers. clpeft ships them unmodified in ``fscil_sessions/``
(with CEC's licence and a NOTICE). They are read as CEC's loaders read them
(``dataloader/data_utils.py``, ``dataloader/{cifar100/cifar,miniimagenet/miniimagenet,cub200/cub200}.py``):

* classes in their natural order: CIFAR-100's fine labels, mini-ImageNet's WordNet ids sorted
  (CEC numbers them in order of first appearance in its ``train.csv``, which is sorted), CUB's
  class ids;
* the base session (``session_1``) trains on every training sample of the first ``n_base``
  classes, selected by class (``session_1.txt`` lists exactly these samples: checked here);
* session ``t > 1`` trains on the samples of ``session_t.txt`` in the file's order: indices into
  CIFAR-100's training split; paths for the others, matched by file name for mini-ImageNet (CEC
  takes ``line.split('/')[3]`` into its ``train.csv`` split) and by ``<class folder>/<file>`` for
  CUB (the release's training split);
* after session ``t`` the model is tested on every test sample of the classes seen so far.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clpeft.errors import UserError
from clpeft.scenarios import folder_datasets

FOLDER = Path(__file__).resolve().parent / "fscil_sessions"
#: dataset -> (n_base, n_way, k_shot, incremental sessions) of the lists.
PROTOCOLS = {"cifar100": (60, 5, 5, 8), "mini_imagenet": (60, 5, 5, 8), "cub200": (100, 10, 5, 10)}
_KEY = "scenario.session_lists"


def session_lines(dataset: str, session: int) -> list[str]:
    """The lines of ``session_<session>.txt`` (1-based, as CEC names them)."""
    return (FOLDER / dataset / f"session_{session}.txt").read_text(encoding="utf-8").splitlines()


def training_keys(dataset: str, root: Path) -> list[str] | None:
    """What a list line names, for every sample of the training split, in its order: ``None``
    for CIFAR-100 (lines are indices), file names for mini-ImageNet (CEC's ``train.csv``, the
    order of ``split: cec``), ``<class folder>/<file>`` for CUB (the release's training split)."""
    if dataset == "mini_imagenet":
        return [name for name, _, _ in folder_datasets.mini_imagenet_cec_rows("train")]
    if dataset == "cub200":
        return folder_datasets.cub200_training_files(root)
    return None


def line_key(dataset: str, line: str) -> str:
    """The key a list line gives its sample (see :func:`training_keys`)."""
    if dataset == "mini_imagenet":
        return line.split("/")[3]
    return "/".join(line.split("/")[-2:])


def plan(
    dataset: str, train_targets: np.ndarray, test_targets: np.ndarray, keys: list[str] | None, n_sessions: int
) -> tuple[list[int], list[dict], list[int]]:
    """Class order, sessions (classes, ``k_shot``, training indices) and test indices of the
    first ``n_sessions`` incremental sessions, checked against the data.

    Raises:
        UserError: the data does not match the lists (a sample missing, a session's samples of
            other classes, the base classes' training samples not those of ``session_1``).
    """
    n_base, n_way, k_shot, _ = PROTOCOLS[dataset]
    n_classes = n_base + n_sessions * n_way
    position = None if keys is None else {k: i for i, k in enumerate(keys)}
    if keys is not None and len(keys) != len(train_targets):
        raise UserError(
            f"the training split has {len(train_targets)} samples, CEC's {len(keys)}; check scenario.root and dataset_options", key=_KEY
        )

    def indices(session: int) -> np.ndarray:
        lines = session_lines(dataset, session)
        try:
            idx = [int(line) for line in lines] if position is None else [position[line_key(dataset, line)] for line in lines]
        except KeyError as exc:
            raise UserError(
                f"session_{session}.txt names {exc.args[0]}, which is not in this dataset's training split; check scenario.root", key=_KEY
            ) from None
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(train_targets)):
            raise UserError(f"session_{session}.txt indexes beyond the {len(train_targets)} training samples", key=_KEY)
        return idx

    base = np.arange(n_base)
    base_idx = np.concatenate([np.flatnonzero(train_targets == c) for c in base])  # CEC's SelectfromDefault order
    if set(indices(1).tolist()) != set(base_idx.tolist()):
        raise UserError(
            f"the training samples of the first {n_base} classes are not those of CEC's session_1.txt; check scenario.root", key=_KEY
        )
    sessions = [{"session": 0, "classes": base.tolist(), "k_shot": None, "train_indices": base_idx.tolist()}]
    for s in range(1, n_sessions + 1):
        classes = np.arange(n_base + (s - 1) * n_way, n_base + s * n_way)
        idx = indices(s + 1)
        if sorted(train_targets[idx].tolist()) != sorted(np.repeat(classes, k_shot).tolist()):
            raise UserError(
                f"the samples of CEC's session_{s + 1}.txt are not {k_shot} of each class "
                f"{classes.min()}..{classes.max()} in this dataset; check scenario.root",
                key=_KEY,
            )
        sessions.append({"session": s, "classes": classes.tolist(), "k_shot": k_shot, "train_indices": idx.tolist()})
    test_idx = np.flatnonzero(test_targets < n_classes)
    return list(range(n_classes)), sessions, test_idx.tolist()
