"""The scorer's broadcast attention is nn.MultiheadAttention's, computed once per frame."""
import torch

from models.reward_model import FusionBlock, ModelConfig, Scorer


def test_fusion_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    block = FusionBlock(32, 4, dropout=0.1).eval()
    text, patches = torch.randn(5, 3, 32), torch.randn(5, 9, 32)
    queries = block.norm_q(text)
    expected, _ = block.cross(queries, patches, patches, need_weights=False)
    got = block.cross.out_proj(block._attend(queries, patches))
    assert torch.allclose(got, expected, atol=1e-6)


def test_every_candidate_against_every_frame_equals_scoring_the_pairs_one_by_one():
    torch.manual_seed(1)
    scorer = Scorer(ModelConfig(d_model=32, fusion_heads=4, text_heads=4, fusion_layers=2)).eval()
    patches, texts = torch.randn(3, 25, 32), torch.randn(7, 4, 32)
    with torch.no_grad():
        grid = scorer(patches, texts)
        pairs = scorer.score_pairs(patches.repeat_interleave(7, 0), texts.repeat(3, 1, 1)).reshape(3, 7)
    assert grid.shape == (3, 7) and torch.allclose(grid, pairs, atol=1e-5)


def test_frozen_minilm_gives_the_same_states_in_training_as_in_evaluation():
    """MiniLM is frozen and its states cached per text: in training they must be the clean ones
    evaluation sees, not one dropout draw kept for the whole run."""
    from models.reward_model import MiniLMTextEncoder
    torch.manual_seed(0)
    encoder = MiniLMTextEncoder(ModelConfig(d_model=32, text_heads=4, text_encoder="minilm")).train()
    ids, mask = torch.tensor([[101, 7592, 2088, 102, 0]]), torch.tensor([[1, 1, 1, 1, 0]])
    cached = encoder.bert_states(ids, mask)
    assert encoder.training and not encoder.bert.training
    with torch.no_grad():
        clean = encoder.bert.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(cached, clean)
