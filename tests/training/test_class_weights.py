"""Class-balanced multimodal pairs: defective ELPV cells can weigh more than functional ones."""
import numpy as np
import torch

from training.config import StageConfig
from training.data import elpv
from training.data.batches import elpv_set, synthetic_set
from training.stages import TrainBatch, class_weights


def _batch(data, idx):
    return TrainBatch(data.images[idx], [], 8, None, data.defective(idx))


def test_defective_cells_weigh_defective_weight_times_a_functional_cell():
    data = elpv_set("train", 64, limit=60)
    idx = np.arange(len(data))
    defective = data.defective(idx)
    assert defective.any() and not defective.all()
    assert (defective == np.array([elpv.LEVELS[l] >= 0.5 for l in data.levels])).all()
    w = class_weights(_batch(data, idx), StageConfig("multimodal", defective_weight=2.5))[:, 0]
    assert torch.allclose(w[defective] / w[~defective].mean(), torch.tensor(2.5))
    assert torch.isclose(w.mean(), torch.tensor(1.0))      # reweights, keeps the step size


def test_default_weight_and_unlabelled_frames_leave_pairs_alone():
    data = elpv_set("train", 64, limit=20)
    idx = np.arange(len(data))
    assert torch.equal(class_weights(_batch(data, idx), StageConfig("multimodal")), torch.ones(len(idx), 1))
    syn = synthetic_set("s", 6, 64, seed=0, on_elpv_fraction=0.0, backgrounds=None)
    assert syn.defective(np.arange(6)) is None
    batch = TrainBatch(syn.images, [], 4, None, None)
    assert torch.equal(class_weights(batch, StageConfig("multimodal", defective_weight=3.0)), torch.ones(6, 1))
