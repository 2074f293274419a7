"""Bad positional-encoding input is one clear line from ``lowbit.run.build``, before any training step."""

import math

import pytest

from lowbit.config import compose
from lowbit.errors import LowbitError
from lowbit.run import build


@pytest.mark.parametrize(
    "overrides, match",
    [
        # odd head dimension for RoPE: 30 wide, 2 heads → head_dim 15
        (["posenc=rope", "model.dim=30", "model.n_heads=2"], "rope needs an even head_dim, got 15"),
        # a 2-D-only encoding on text: a learned or Fourier table built for an image grid
        (["posenc=learned", "+posenc.grid=[4,4]"], "LearnedPE is 2-D only; a GPT needs a 1-D encoding"),
        (["posenc=fourier", "+posenc.grid=[4,4]"], "FourierPE is 2-D only; a GPT needs a 1-D encoding"),
        # unknown scaling mode, and a YaRN ramp that is not one
        (["posenc=rope", "posenc.scaling=linear"], "unknown rope scaling 'linear'; valid: none, pi, ntk, yarn"),
        (
            ["posenc=rope", "posenc.scaling=yarn", "posenc.scale=4.0", "posenc.yarn_alpha=40.0"],
            "needs 0 ≤ yarn_alpha < yarn_beta, got yarn_alpha=40.0, yarn_beta=32.0",
        ),
        (["posenc=rope", "posenc.scale=2.0"], "rope scale=2.0 has no effect with scaling='none'"),
        (["posenc=kerple", "posenc.variant=exp"], "unknown kerple variant 'exp'; valid: log, power"),
        (["posenc=t5", "posenc.num_buckets=1"], "t5 bias needs num_buckets ≥ 2"),
    ],
)
def test_bad_posenc_is_one_clear_line_at_build(overrides, match):
    cfg = compose(["debug=smoke", "logger=csv", *overrides]).cfg
    with pytest.raises(LowbitError, match=match) as err:
        build(cfg)
    assert "\n" not in str(err.value)


def test_a_good_yarn_config_builds():
    cfg = compose(["debug=smoke", "logger=csv", "posenc=rope", "posenc.scaling=yarn", "posenc.scale=4.0"]).cfg
    posenc = build(cfg).task.model.posenc
    assert posenc.scaling == "yarn" and posenc.attention_factor == pytest.approx(0.1 * math.log(4) + 1)
