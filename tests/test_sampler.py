"""The rCM sampler against the reference's recorded loops (rcm_sampler_* fixtures)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from turbo_repl.engine import sampler


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture(scope="module")
def t2v(fixtures_dir):
    meta = json.loads((fixtures_dir / "rcm_sampler_t2v.json").read_text())
    return meta, load_file(fixtures_dir / meta["files"]["io"]["file"])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_schedule_matches_reference(t2v, steps):
    meta, io = t2v
    times = sampler.rf_times(steps, meta["config"]["sigma_max"])
    assert torch.equal(times, io[f"n{steps}.sde.t_steps"])


def test_bf16_timesteps_are_the_rounded_ones():
    fed = sampler.network_timesteps(sampler.rf_times(4, 80.0)[:-1], 1, torch.bfloat16, "cpu")
    # values the reference documents for its bf16 network input (engine-facts §4.1)
    assert fed.flatten().tolist() == [988.0, 932.0, 852.0, 608.0]
    fed = sampler.network_timesteps(sampler.rf_times(4, 200.0)[:1], 1, torch.bfloat16, "cpu")
    assert fed.item() == 996.0


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_loop_reproduces_reference_given_its_velocities(t2v, steps, mode):
    """Feed the recorded v_pred per step: the loop itself must reproduce x_in and final bit for bit."""
    meta, io = t2v
    p = f"n{steps}.{mode}"
    seen = []

    def velocity(x_in, timesteps, i):
        seen.append(i)
        assert torch.equal(x_in, io[f"{p}.step{i}.x_in"])
        assert torch.equal(timesteps, io[f"{p}.step{i}.timesteps_B_T"])
        return io[f"{p}.step{i}.v_pred"]

    final = sampler.sample(velocity, io[f"{p}.init_noise"], steps=steps, sigma_max=meta["config"]["sigma_max"],
                           ode=mode == "ode", dtype=torch.float32,
                           step_noise=lambda i: io[f"{p}.step{i}.noise"])
    assert seen == list(range(steps))
    assert torch.equal(final, io[f"{p}.final"])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_seeded_generator_reproduces_reference_draws(t2v, steps):
    """Same seed, same CPU generator call order: the same initial noise and the same per-step SDE draws."""
    meta, io = t2v
    p = f"n{steps}.sde"
    g = torch.Generator().manual_seed(meta["config"]["seed"])
    noise = sampler.initial_noise(io[f"{p}.init_noise"].shape, g, "cpu")
    assert torch.equal(noise, io[f"{p}.init_noise"])
    final = sampler.sample(lambda x, t, i: io[f"{p}.step{i}.v_pred"], noise, steps=steps,
                           sigma_max=meta["config"]["sigma_max"], ode=False, dtype=torch.float32, generator=g)
    assert torch.equal(final, io[f"{p}.final"])


@pytest.mark.parametrize("steps,expected", [(1, [0]), (2, [0, 0]), (3, [0, 0, 1]), (4, [0, 0, 1, 1])])
def test_expert_switch_at_boundary(steps, expected):
    # r = 0.995, 0.934 are >= 0.9 (high noise); 0.853, 0.609 are below (low noise)
    assert sampler.expert_steps(sampler.rf_times(steps, 200.0), 0.9) == expected


def test_expert_switch_happens_once():
    times = torch.tensor([0.95, 0.85, 0.92, 0.5, 0.0], dtype=torch.float64)
    assert sampler.expert_steps(times, 0.9) == [0, 1, 1, 1]


def test_bad_steps_and_sigma_are_refused():
    with pytest.raises(ValueError, match="steps must be between 1 and 4"):
        sampler.rf_times(5, 80.0)
    with pytest.raises(ValueError, match="sigma_max must be > 0"):
        sampler.rf_times(2, 0.0)
