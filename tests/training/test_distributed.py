"""Multi-process training (torchrun/DDP): every rank must run the same steps, and every
trained model (the shortcut proxy included) must stay the same on every rank."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training import distributed
from training.config import StageConfig
from training.data.batches import CandidateSet
from training.stages import _count_steps, _mixed_batches
from micro import MICRO_MODELS

ROOT = Path(__file__).resolve().parents[2]

COMBOS = [(n, world, batch) for n in (0, 1, 5, 8, 16, 17, 31, 100) for world in (1, 2, 3, 4, 7)
          for batch in (1, 4, 8)]


class Dummy(CandidateSet):
    flippable = False

    def texts(self, i, rng, heldout=False, display=False):
        return [f"{self.name} right {i}", f"{self.name} wrong {i}"]


def _dummy(name, n):
    return Dummy(name, np.zeros((n, 4, 4), np.uint8), [str(i) for i in range(n)])


def _as_rank(monkeypatch, rank, world):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))


def test_single_process_shard_is_every_index_in_order():
    idx = np.arange(17)
    assert np.array_equal(distributed.shard(idx), idx)
    assert np.array_equal(distributed.shard(idx, 0, 1), idx)


@pytest.mark.parametrize("n,world,batch", COMBOS)
def test_every_rank_gets_an_equal_shard_covering_the_data(n, world, batch):
    shards = [distributed.shard(np.arange(n), r, world) for r in range(world)]
    per_rank = -(-n // world)
    assert all(len(s) == per_rank for s in shards), [len(s) for s in shards]
    assert set(np.concatenate(shards).tolist()) == set(range(n))
    if n % world == 0:   # no padding: a partition
        assert sorted(np.concatenate(shards).tolist()) == list(range(n))


@pytest.mark.parametrize("n,world,batch", COMBOS)
def test_every_rank_runs_the_same_batches_per_epoch(n, world, batch, monkeypatch):
    """Several sets of different sizes, with and without a step cap: the planned and the
    yielded step counts, and the order of sets, agree on every rank."""
    sets = [_dummy("a", n), _dummy("b", n // 2 + 3)]
    for cap in (None, 2):
        stage = StageConfig("multimodal", batch_size=batch, max_steps_per_epoch=cap)
        seen = []
        for rank in range(world):
            _as_rank(monkeypatch, rank, world)
            planned = _count_steps(sets, stage)
            got = list(_mixed_batches(sets, batch, np.random.default_rng([0, 1]), cap))
            assert len(got) == planned, (rank, planned, len(got))
            seen.append([(len(b.frames), b.texts[0].split()[0]) for b in got])
        assert all(s == seen[0] for s in seen), f"ranks disagree: {seen}"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import hashlib, json, os, sys
sys.path.insert(0, {root!r})
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch
from training import train as T
from training.config import load_config

def digest(model):
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()

run_stage = T.run_stage
def recording(stage, model, *args, proxy=None, **kwargs):
    metrics = run_stage(stage, model, *args, proxy=proxy, **kwargs)
    record = {{"model": digest(model), "proxy": digest(proxy) if proxy is not None else None,
              "epochs": len(metrics["history"])}}
    rank = os.environ["RANK"]
    open(os.path.join(sys.argv[2], f"{{stage.name}}-rank{{rank}}.json"), "w").write(json.dumps(record))
    return metrics
T.run_stage = recording
T.train(load_config(sys.argv[1]), sys.argv[2])
"""

# 17 text pairs, batch 8 on 2 ranks: 9 + 8 without padding (2 steps against 1), 9 + 9 with it
DDP_CONFIG = """\
seed: 0
threads: 1
""" + MICRO_MODELS + """\
data: {elpv_train_limit: 9, elpv_val_limit: 4, synthetic_train: 5, synthetic_val: 4, synthetic_negatives: 3, text_pairs: 17}
stages:
  - {name: text, epochs: 1, lr: 0.003, batch_size: 8}
  - {name: multimodal, epochs: 1, lr: 0.003, batch_size: 4, fact_loss: 0.5}
"""


def test_two_gloo_processes_stay_in_step_and_agree(tmp_path):
    """Two CPU processes (gloo) through torchrun: both finish every stage, and the teacher and
    the shortcut proxy end up the same on both ranks (their gradients were averaged)."""
    (tmp_path / "worker.py").write_text(WORKER.format(root=str(ROOT)))
    (tmp_path / "ddp.yaml").write_text(DDP_CONFIG)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()

    def launch():
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                                 "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                                 str(tmp_path / "worker.py"), str(tmp_path / "ddp.yaml"), str(out)],
                                capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
        return {stage: [json.loads((out / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)]
                for stage in ("text", "multimodal")}

    first = launch()
    for stage, ranks in first.items():
        assert ranks[0] == ranks[1], f"{stage}: the ranks' models differ: {ranks}"
    assert first["multimodal"][0]["proxy"] is not None
    assert (out / "multimodal" / "proxy" / "model.safetensors").exists()
    assert (out / "multimodal" / "run_state.rank1.pt").exists()
    # started again: both ranks skip the finished stages and reload the same models
    assert launch() == first
    print(f"2-process run: {time.time() - started:.0f} s")
