"""A seconds-long recipe run through every stage, then evaluation (litgpt-style)."""
import json
import subprocess
import sys
from pathlib import Path


from training.config import load_config
from training.data import elpv
from training.train import train

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"


def test_every_stage_trains_every_parameter_and_lowers_the_loss(tiny_run):
    out, summary = tiny_run
    assert [s["stage"] for s in summary["stages"]] == ["text", "classify", "multimodal", "distill"]
    for stage in summary["stages"]:
        unchanged = stage["unchanged_parameters"]
        if stage["stage"] == "classify":   # the trunk and level heads only: no preference pairs yet
            trained = [n for n in unchanged if "image_encoder" in n or "_level" in n]
            assert trained == [] and any("fusion" in n or "blocks" in n for n in unchanged), unchanged
        else:
            assert unchanged == [], stage["stage"]
        first, last = stage["history"][0]["loss_first"], stage["history"][-1]["loss_last"]
        assert last < first, f"{stage['stage']}: loss {first:.4f} -> {last:.4f}"
    for rel in ("text/model", "multimodal/model", "multimodal/proxy", "distill/model"):
        assert (out / rel / "model.safetensors").exists()


def test_image_stages_keep_the_epoch_their_select_figure_names(tiny_run):
    """History logs val ELPV binary accuracy per epoch; the saved model is the selected epoch's."""
    from models.preprocess import PreprocessSpec
    from models.reward_model import load_model
    from training.config import SELECT_BY
    from training.data.batches import elpv_set
    from training.evaluate import elpv_binary_accuracy
    from training.stages import Encoder
    out, summary = tiny_run
    cfg = load_config(TINY)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["distill"]["selected_by"] == SELECT_BY["elpv_binary"]
    assert stages["multimodal"]["selected_by"] == SELECT_BY["pairwise"]
    for name in ("multimodal", "distill"):
        history, key = stages[name]["history"], stages[name]["selected_by"]
        figures = [h[key] for h in history]
        assert all(0 <= h["val_elpv_binary_accuracy"] <= 1 for h in history), name
        kept = max(i for i, f in enumerate(figures) if f == max(figures)) + 1   # ties: the later epoch
        assert stages[name]["best_epoch"] == kept, name
    model = load_model(out / "distill" / "model")
    val = elpv_set("val", model.config.image_size, cfg.data.elpv_val_limit, cfg.data.elpv_types, cfg.seed)
    enc = Encoder(PreprocessSpec(model.config.image_size, max_tokens=model.config.max_tokens))
    assert elpv_binary_accuracy(model, enc, val) == stages["distill"]["val_elpv_binary_accuracy"]


def test_test_split_never_reaches_training(tiny_run):
    out, _ = tiny_run
    used = set(json.loads((out / "train_ids.json").read_text())["elpv_ids"])
    split = elpv.load_split()
    assert used, "the run used no ELPV cells at all"
    assert used.isdisjoint(split["test"])
    assert used <= set(split["train"]) | set(split["val"])


def test_split_is_stratified_and_fixed():
    split = elpv.load_split()
    assert split == {k: v for k, v in elpv.make_split(elpv.read_cells()).items()}
    n = sum(len(v) for v in split.values())
    assert n == 2624
    assert abs(len(split["test"]) / n - 0.25) < 0.01
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))


def test_resume_skips_finished_stages(tiny_run):
    out, summary = tiny_run
    again = train(load_config(TINY), out)
    assert [s["val_pairwise_accuracy"] for s in again["stages"]] == \
           [s["val_pairwise_accuracy"] for s in summary["stages"]]


def test_eval_writes_json_with_flat_keys_and_report(tiny_run, tmp_path):
    out, _ = tiny_run
    result = subprocess.run([sys.executable, "-m", "linejudge_cli", "eval", "--model", str(out),
                             "--split", "val", "--json", str(tmp_path / "m.json"), "--limit", "16"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    for key in ("elpv_binary_accuracy", "elpv_level_accuracy", "pairwise_accuracy", "image_swap_accuracy",
                "heldout_phrasing_accuracy", "ece", "text_only_proxy_accuracy", "teacher_pairwise_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (tmp_path / "m.html").exists()
    assert (tmp_path / "m_confusion_levels.png").stat().st_size > 1000
    by_fact = {k: v for k, v in metrics.items() if k.startswith("synthetic_pairwise_accuracy_")}
    assert "synthetic_pairwise_accuracy_presence" in by_fact and all(0 <= v <= 1 for v in by_fact.values())


def test_fact_head_trains_but_never_ships_with_the_model(tiny_run):
    import torch
    from safetensors.torch import load_file
    out, _ = tiny_run
    for stage in ("multimodal", "distill"):
        state = torch.load(out / stage / "checkpoint.pt", weights_only=False)
        assert state["fact_head"] is not None, f"{stage}: the fact head is not checkpointed for resume"
        saved = load_file(str(out / stage / "model" / "model.safetensors"))
        assert not any("fact" in key for key in saved), f"{stage}: a training-only head reached the model"


def test_fact_loss_reaches_the_image_features_only():
    import numpy as np
    import torch
    from models.reward_model import ModelConfig, RewardModel
    from training.stages import FactHead
    cfg = ModelConfig(image_size=64, d_model=32, text_heads=2, fusion_heads=2, summary_tokens=2,
                      max_tokens=16, pretrained_image=False, frozen_blocks=12)
    model = RewardModel(cfg).eval()
    images = torch.randn(2, 1, 64, 64)
    ids, mask = torch.randint(1000, 2000, (6, 16)), torch.ones(6, 16, dtype=torch.long)
    r, patches, image_levels, _ = model(images, ids, mask, 3, with_patches=True)
    assert torch.equal(r, model(images, ids, mask, 3)) and patches.shape == (2, cfg.grid ** 2, 32)
    assert image_levels is None, "a model without level_weight has no level head"
    FactHead(cfg.grid, cfg.d_model)(patches, np.array([[0, 0, 0], [3, 5, 2]])).backward()
    assert model.image_encoder.project.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_level_head_adds_the_log_probability_of_the_stated_level():
    """reward = fusion + match + level_weight * sum_l q_l(text) log p_l(frame): with the other
    terms zeroed and a text head that states one level, the reward is level_weight * log p."""
    import numpy as np
    import torch
    from models.reward_model import ModelConfig, RewardModel
    from training.stages import TrainBatch, level_term
    cfg = ModelConfig(image_size=64, d_model=32, text_heads=2, fusion_heads=2, summary_tokens=2,
                      max_tokens=16, pretrained_image=False, frozen_blocks=12, level_weight=2.0)
    model = RewardModel(cfg).eval()
    scorer = model.scorer
    with torch.no_grad():
        for p in (*scorer.head[-1].parameters(), *scorer.image_match.parameters()):
            p.zero_()
        scorer.text_level.weight.zero_()
        scorer.text_level.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))   # every text states level 2
    images = torch.randn(2, 1, 64, 64)
    ids, mask = torch.randint(1000, 2000, (6, 16)), torch.ones(6, 16, dtype=torch.long)
    out = model(images, ids, mask, 3, with_patches=True)
    log_p = torch.log_softmax(out.image_levels, -1)[:, 2:3].expand(2, 3)
    assert torch.allclose(out.rewards, 2.0 * log_p, atol=1e-4)
    batch = TrainBatch(None, [], 3, None, np.array([0, 3]), np.array([[0, 1, 2], [3, 0, 1]]))
    torch.nn.init.normal_(scorer.text_level.weight)   # let the text side's gradient through again
    model.train()
    level_term(model(images, ids, mask, 3, with_patches=True), batch, 1.0).backward()
    assert model.image_encoder.project.weight.grad.abs().sum() > 0     # the image side learns the level
    assert model.text_encoder.pool.queries.grad.abs().sum() > 0          # and the text side what it states
