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
        # epoch means, not the first and last fifth of the steps: in the tiny recipe a fifth is one
        # step, and one step's loss (an ELPV or a synthetic batch) decided it by the CPU's rounding
        first, last = stage["history"][0]["loss"], stage["history"][-1]["loss"]
        assert last < 0.95 * first, f"{stage['stage']}: epoch mean loss {first:.4f} -> {last:.4f}"
    for rel in ("text/model", "multimodal/model", "multimodal/proxy", "distill/model"):
        assert (out / rel / "model.safetensors").exists()


def test_image_stages_keep_the_epoch_their_select_figure_names(tiny_run):
    """History logs val ELPV binary accuracy per epoch; the saved model is the selected epoch's."""
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
    enc = Encoder(model.config.preprocess_spec())
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


def test_fact_slots_train_and_ship_with_the_model(tiny_run):
    """tiny.yaml has fact slots (fact_weight > 0): their heads are part of the saved model (and
    so of scorer.onnx), and no training-only fact head is made beside them."""
    import torch
    from safetensors.torch import load_file
    out, _ = tiny_run
    for stage in ("multimodal", "distill"):
        state = torch.load(out / stage / "checkpoint.pt", weights_only=False)
        assert state["fact_head"] is None, f"{stage}: a training-only fact head beside the model's fact slots"
        saved = load_file(str(out / stage / "model" / "model.safetensors"))
        assert any(k.startswith("scorer.image_facts.") for k in saved), stage
        assert any(k.startswith("scorer.text_facts.") for k in saved), stage


def test_fact_head_trains_but_never_ships_with_a_model_without_fact_slots(tmp_path):
    import torch
    from safetensors.torch import load_file
    from tests.training.micro import MICRO_MODELS
    config = tmp_path / "facthead.yaml"
    config.write_text("seed: 0\nthreads: 2\n" + MICRO_MODELS.replace("}", ", level_weight: 1.0}") +
                      "data: {elpv_train_limit: 8, elpv_val_limit: 4, synthetic_train: 8, synthetic_val: 4, "
                      "text_pairs: 16}\nstages:\n"
                      "  - {name: multimodal, epochs: 1, batch_size: 8, fact_loss: 0.5, level_loss: 0.5}\n")
    train(load_config(config), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "multimodal" / "checkpoint.pt", weights_only=False)
    assert state["fact_head"] is not None, "the fact head is not checkpointed for resume"
    saved = load_file(str(tmp_path / "run" / "multimodal" / "model" / "model.safetensors"))
    assert not any("fact" in key for key in saved), "a training-only head reached the model"


def test_fact_slot_adds_the_log_probability_of_each_stated_fact():
    """reward = ... + fact_weight * sum_s sum_v q_s(v|text) log p_s(v|frame): with the other terms
    zeroed and text heads that state type 2, cell 5 and "severity not stated", the reward is
    fact_weight * (log p_type(2) + log p_cell(5)); and the fact loss reaches both towers."""
    import numpy as np
    import torch
    from models.reward_model import FACT_SLOTS, ModelConfig, RewardModel
    from training.config import StageConfig
    from training.data.synthetic import FACT_CLASSES
    from training.stages import TrainBatch, fact_term
    assert FACT_CLASSES == tuple(k for _, k in FACT_SLOTS)
    cfg = ModelConfig(image_size=64, d_model=32, text_heads=2, fusion_heads=2, summary_tokens=3,
                      max_tokens=16, pretrained_image=False, frozen_blocks=12, fact_weight=1.5)
    model = RewardModel(cfg).eval()
    scorer = model.scorer
    stated = (2, 5, FACT_CLASSES[2])          # the last class of a text head: not stated
    with torch.no_grad():
        for p in (*scorer.head[-1].parameters(), *scorer.image_match.parameters()):
            p.zero_()
        for head, value in zip(scorer.text_facts, stated):
            head.weight.zero_()
            head.bias.fill_(0.0)
            head.bias[value] = 50.0
    images = torch.randn(2, 1, 64, 64)
    ids, mask = torch.randint(1000, 2000, (6, 16)), torch.ones(6, 16, dtype=torch.long)
    out = model(images, ids, mask, 3, with_patches=True)
    log_p = [torch.log_softmax(lg, -1) for lg in out.image_facts]
    expected = 1.5 * (log_p[0][:, 2] + log_p[1][:, 5])[:, None].expand(2, 3)
    assert torch.allclose(out.rewards, expected, atol=1e-4)
    for head in scorer.text_facts:
        torch.nn.init.normal_(head.weight)       # let the text side's gradient through again
    model.train()
    text_facts = np.array([[[1, 2, 3], [0, 0, 0], [7, 10, 4]]] * 2)   # truth, no defect, an ELPV text
    batch = TrainBatch(None, [], 3, np.array([[1, 2, 3], [0, 0, 0]]), text_facts=text_facts)
    fact_term(None, model(images, ids, mask, 3, with_patches=True), batch,
              StageConfig(name="multimodal", fact_loss=1.0)).backward()
    assert model.image_encoder.project.weight.grad.abs().sum() > 0     # the image side learns the facts
    assert model.text_encoder.pool.queries.grad.abs().sum() > 0          # and the text side what it states


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
    r, patches, image_levels = model(images, ids, mask, 3, with_patches=True)[:3]
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
