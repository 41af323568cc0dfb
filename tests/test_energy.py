"""Energy accounting: exact operation counts on hand-computable spike patterns, and energy per action.

Conventions under test (``spikeq.analysis.energy``): an input spike costs one synaptic operation (SOP) per
synapse it really reaches (border-aware for convolutions), a layer with analog input costs its dense
MACs once per presentation, and with the 45 nm model E = 4.6 pJ * MACs + 0.9 pJ * SOPs.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.dqn.policies import CnnPolicy, MlpPolicy
from torch import nn

from spikeq import NetworkSpec, SpikingQNetwork
from spikeq.analysis.energy import (
    ENERGY_MODELS,
    EnergyCounts,
    EnergyMeter,
    EnergyModel,
    EnergyReport,
    ann_layer_macs,
    ann_macs,
    count_activity,
    count_macs,
    count_sops,
    energy_report,
    load_energy_model,
)

PROFILES = Path(__file__).parent.parent / "experiments" / "energy_profiles"
FRAMES = spaces.Box(0, 255, (4, 84, 84), np.uint8)  # 4 stacked 84x84 frames, channel-first
PONG_ACTIONS = spaces.Discrete(6)
NUM_STEPS = 4

# Nature-DQN MACs per observation: out_channels * H' * W' * (in_channels * kh * kw), Linear in * out
CONV1_MACS = 32 * 20 * 20 * (4 * 8 * 8)  # 84 -> (84 - 8) / 4 + 1 = 20
CONV2_MACS = 64 * 9 * 9 * (32 * 4 * 4)  # 20 -> (20 - 4) / 2 + 1 = 9
CONV3_MACS = 64 * 7 * 7 * (64 * 3 * 3)  # 9 -> 9 - 3 + 1 = 7
FC1_MACS = 3136 * 512  # 64 * 7 * 7 = 3136 inputs
FC2_MACS = 512 * 6
NATURE_MACS = CONV1_MACS + CONV2_MACS + CONV3_MACS + FC1_MACS + FC2_MACS
# Spiking neurons of the torso: conv1 32x20x20, conv2 64x9x9, conv3 64x7x7, fc1 512
TORSO_NEURONS = 32 * 20 * 20 + 64 * 9 * 9 + 64 * 7 * 7 + 512


def spikes_at(channels: int, size: int, *positions: tuple[int, int, int]) -> torch.Tensor:
    """``[T=1, B=1, C, size, size]`` zeros with one spike at each (channel, row, column)."""
    spikes = torch.zeros(1, 1, channels, size, size)
    for c, y, x in positions:
        spikes[0, 0, c, y, x] = 1.0
    return spikes


@pytest.mark.parametrize(
    ("conv", "size", "position", "expected"),
    [
        # 3x3 kernel, padding 1, stride 1 on 4x4 (4x4 outputs, window i covers rows i-1..i+1), 2 out
        # channels: a pixel feeds (rows covering it) * (columns covering it) * 2 synapses.
        (nn.Conv2d(1, 2, 3, padding=1), 4, (0, 0, 0), 2 * 2 * 2),  # corner: 2 rows x 2 columns
        (nn.Conv2d(1, 2, 3, padding=1), 4, (0, 0, 1), 2 * 3 * 2),  # edge: 2 rows x 3 columns
        (nn.Conv2d(1, 2, 3, padding=1), 4, (0, 1, 2), 3 * 3 * 2),  # interior: the full 3x3
        # 3x3 kernel, stride 2 on 5x5: 2x2 outputs, windows over rows/columns 0-2 and 2-4.
        (nn.Conv2d(1, 1, 3, stride=2), 5, (0, 2, 2), 2 * 2),  # in both windows each way
        (nn.Conv2d(1, 1, 3, stride=2), 5, (0, 2, 0), 2 * 1),
        (nn.Conv2d(1, 1, 3, stride=2), 5, (0, 1, 3), 1 * 1),
        # 2x2 kernel, stride 3 on 5x5: windows over rows 0-1 and 3-4, row/column 2 feeds nothing.
        (nn.Conv2d(1, 1, 2, stride=3), 5, (0, 2, 2), 0),
        (nn.Conv2d(1, 1, 2, stride=3), 5, (0, 2, 4), 0),
        (nn.Conv2d(1, 1, 2, stride=3), 5, (0, 4, 4), 1),
        # 2x2 kernel, dilation 2 on 3x3: one window tapping the four corners only.
        (nn.Conv2d(1, 1, 2, dilation=2), 3, (0, 1, 1), 0),
        (nn.Conv2d(1, 1, 2, dilation=2), 3, (0, 2, 2), 1),
        # 4 -> 6 channels in 2 groups, 2x2 on 3x3 (2x2 outputs): the centre is in all 4 windows of
        # the 3 output channels of its own group only.
        (nn.Conv2d(4, 6, 2, groups=2), 3, (0, 1, 1), 4 * 3),
        (nn.Conv2d(4, 6, 2, groups=2), 3, (3, 1, 1), 4 * 3),
        # Circular padding wraps around: on 3x3 with a 3x3 kernel every pixel is in all 9 windows.
        (nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), 3, (0, 0, 0), 9),
    ],
)
def test_conv_sops_use_the_real_fan_out_of_each_spike(conv, size, position, expected):
    assert count_sops(conv, spikes_at(conv.in_channels, size, position)) == expected


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 32, 8, stride=4),  # the Nature-DQN convolutions
        nn.Conv2d(32, 64, 4, stride=2),
        nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
    ],
)
def test_conv_sops_equal_the_spikes_in_every_receptive_field(conv):
    # The definition: SOPs = sum over output neurons of the input spikes in their receptive field.
    torch.manual_seed(0)
    spikes = (torch.rand(3, 2, conv.in_channels, 20, 20) < 0.3).float()  # [T, B, C, H, W]
    ones = torch.ones_like(conv.weight)
    per_output = torch.nn.functional.conv2d(
        spikes.flatten(0, 1), ones, None, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    assert count_sops(conv, spikes) == int(per_output.sum())


def test_conv_sops_with_every_input_spiking_exclude_the_padding():
    conv = nn.Conv2d(1, 1, 3, padding=1)
    every = torch.ones(2, 3, 1, 4, 4)  # T = 2 steps, B = 3 samples, all 16 pixels spike
    # Fan-out per row (and per column) of a 4x4 map: 2, 3, 3, 2 windows -> (2+3+3+2)^2 = 100 per
    # step and sample, fewer than the 4*4*9 = 144 MACs of the dense layer, which count the padding.
    assert count_sops(conv, every) == 2 * 3 * 100
    assert count_macs(conv, every[:1]) == 3 * 144


def test_conv_sops_sum_over_spikes_steps_and_samples():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    spikes = torch.zeros(3, 2, 1, 4, 4)  # [T, B, C, H, W]
    spikes[0, 0, 0, 0, 0] = 1  # corner: 4 windows x 2 channels = 8
    spikes[2, 1, 0, 1, 2] = 1  # interior: 9 windows x 2 channels = 18
    spikes[2, 1, 0, 0, 1] = 1  # edge: 6 windows x 2 channels = 12
    assert count_sops(conv, spikes) == 8 + 18 + 12


def test_linear_sops_and_macs():
    linear = nn.Linear(5, 7)
    spikes = torch.zeros(2, 3, 5)  # [T=2, B=3, 5 inputs]
    spikes[0, 0, :4] = 1
    spikes[1, 2, 1] = 1
    assert count_sops(linear, spikes) == 5 * 7  # 5 spikes, each reaching all 7 outputs
    assert count_macs(linear, torch.rand(1, 3, 5)) == 3 * 5 * 7  # T' = 1, 3 samples


def test_conv_macs_count_output_elements_times_fan_in():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    inputs = torch.rand(1, 2, 3, 9, 9)  # static input: T' = 1, B = 2
    # 9x9 -> (9 + 2 - 3) / 2 + 1 = 5x5 outputs, 8 channels, fan-in 3 * 3 * 3 = 27
    assert count_macs(conv, inputs) == 2 * 8 * 5 * 5 * 27


def test_only_conv2d_and_linear_are_counted():
    with pytest.raises(ValueError, match="Conv1d.*supported: Conv2d, Linear"):
        count_sops(nn.Conv1d(1, 1, 3), torch.ones(1, 1, 1, 5))


def nature_dsqn(**spec) -> SpikingQNetwork:
    torch.manual_seed(0)
    return SpikingQNetwork(FRAMES, PONG_ACTIONS, NetworkSpec(num_steps=NUM_STEPS, **spec))


def synapse(net: SpikingQNetwork, name: str) -> nn.Module:
    layers = dict(zip(net.layer_names, net.synapses, strict=True))
    layers["fc2"] = net.readout.linear
    layer = layers[name]
    return layer[-1] if isinstance(layer, nn.Sequential) else layer


def constant_current(net: SpikingQNetwork, name: str, bias: float | torch.Tensor) -> None:
    """Zero weights and a fixed bias: every neuron of the layer gets a constant input current.

    With the paper's LIF (tau 2, threshold 1), U[t] = 0.5 (1 - S[t-1]) U[t-1] + I / 2: a current of
    10 fires at every step, a negative current never.
    """
    with torch.no_grad():
        layer = synapse(net, name)
        layer.weight.zero_()
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype).expand_as(layer.bias))


def silent(net: SpikingQNetwork) -> SpikingQNetwork:
    for name in ("conv1", "conv2", "conv3", "fc1"):
        constant_current(net, name, -1.0)
    return net


def frames(batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, *FRAMES.shape), dtype=torch.uint8)


def measure(net: SpikingQNetwork, obs: torch.Tensor, model: str = "45nm") -> EnergyReport:
    meter = EnergyMeter(net)
    meter.q_values(obs)
    return meter.report(model)


def test_a_silent_dsqn_costs_only_the_first_layer_macs():
    report = measure(silent(nature_dsqn()), frames(3))
    assert report.decisions == 3
    assert report.firing_rate == {"conv1": 0.0, "conv2": 0.0, "conv3": 0.0, "fc1": 0.0}
    assert report.spikes_per_action == 0
    assert report.sops_per_action == 0
    # conv1 sees the analog frames once (direct coding), not once per time step
    assert report.macs_per_layer == {"conv1": CONV1_MACS}
    assert report.energy_pj_per_action == pytest.approx(4.6 * CONV1_MACS, rel=1e-12)
    assert report.ann_macs_per_action == NATURE_MACS
    assert report.ann_energy_pj_per_action == pytest.approx(4.6 * NATURE_MACS, rel=1e-12)
    assert report.energy_ratio == pytest.approx(CONV1_MACS / NATURE_MACS, rel=1e-12)
    assert all(isinstance(line, str) and line for line in report.assumptions)


def test_energy_grows_by_0_9_pj_per_readout_synapse_of_every_fc1_spike():
    net = silent(nature_dsqn())
    obs = frames(2)
    energy_silent = measure(net, obs).energy_pj_per_action
    for k in (1, 7, 512):
        # The first k fc1 neurons fire at every step: k * T spikes, each reaching the 6 Q-outputs.
        constant_current(net, "fc1", torch.where(torch.arange(512) < k, 10.0, -10.0))
        report = measure(net, obs)
        assert report.spikes_per_layer["fc1"] == k * NUM_STEPS
        assert report.firing_rate["fc1"] == pytest.approx(k / 512)  # spikes / (neurons * T)
        assert report.sops_per_layer == {"conv2": 0, "conv3": 0, "fc1": 0, "fc2": k * NUM_STEPS * 6}
        assert report.energy_pj_per_action == pytest.approx(
            energy_silent + 0.9 * k * NUM_STEPS * 6, rel=1e-12
        )


def test_when_every_conv1_neuron_fires_conv2_sops_equal_its_dense_macs_per_step():
    net = silent(nature_dsqn())
    constant_current(net, "conv1", 10.0)
    report = measure(net, frames(1))
    assert report.spikes_per_layer["conv1"] == 32 * 20 * 20 * NUM_STEPS
    assert report.firing_rate["conv1"] == 1.0
    # conv2 (k4 s2, no padding) windows lie inside the 20x20 map: all-ones input fills every synapse.
    assert report.sops_per_layer["conv2"] == NUM_STEPS * CONV2_MACS
    assert report.energy_pj_per_action == pytest.approx(
        4.6 * CONV1_MACS + 0.9 * NUM_STEPS * CONV2_MACS, rel=1e-12
    )
    assert report.neuron_updates_per_action == NUM_STEPS * TORSO_NEURONS


def test_poisson_input_makes_the_first_layer_sops_instead_of_macs():
    net = silent(nature_dsqn(encoder="poisson"))
    # Pixels at 255 spike with probability 1 at every step: conv1 gets T dense layers' worth of SOPs.
    white = torch.full((1, *FRAMES.shape), 255, dtype=torch.uint8)
    report = measure(net, white)
    assert report.macs_per_action == 0
    assert report.sops_per_layer["conv1"] == NUM_STEPS * CONV1_MACS
    assert report.energy_pj_per_action == pytest.approx(0.9 * NUM_STEPS * CONV1_MACS, rel=1e-12)
    black = torch.zeros((1, *FRAMES.shape), dtype=torch.uint8)
    assert measure(net, black).sops_per_action == 0
    # Loihi prices SOPs and neuron updates; without MACs the total needs no MAC price.
    loihi = measure(net, white, "loihi")
    assert loihi.energy_pj_per_action == pytest.approx(
        23.6 * NUM_STEPS * CONV1_MACS + 81.0 * NUM_STEPS * TORSO_NEURONS, rel=1e-12
    )
    # ...but it has no MAC price, so the dense ANN twin cannot be priced and neither the ratio.
    assert loihi.ann_energy_pj_per_action is None
    assert loihi.energy_ratio is None


def test_a_direct_coded_dsqn_has_no_loihi_energy_total():
    report = measure(silent(nature_dsqn()), frames(1), "loihi")
    assert report.energy_breakdown_pj == {
        "macs": None,
        "sops": 0.0,
        "neuron_updates": 81.0 * NUM_STEPS * TORSO_NEURONS,
    }
    assert report.energy_pj_per_action is None


def mlp_dsqn(readout: str = "rate") -> SpikingQNetwork:
    """3 inputs -> 4 LIF neurons -> 2 actions."""
    torch.manual_seed(0)
    spec = NetworkSpec(num_steps=5, net_arch=(4,), readout=readout)
    return SpikingQNetwork(spaces.Box(0.0, 1.0, (3,)), spaces.Discrete(2), spec)


def test_the_meter_accumulates_decisions_and_averages_per_action():
    net = mlp_dsqn()
    meter = EnergyMeter(net)
    obs = torch.rand(1, 3)
    constant_current(net, "fc1", torch.tensor([10.0, -10.0, -10.0, -10.0]))  # 1 neuron fires
    meter.q_values(obs)
    constant_current(net, "fc1", torch.tensor([10.0, 10.0, 10.0, -10.0]))  # 3 neurons fire
    meter.q_values(obs)
    counts = meter.counts
    assert counts.decisions == 2
    assert counts.spikes == {"fc1": (1 + 3) * 5}
    assert counts.spikes_per_action == 10
    assert counts.firing_rate == {"fc1": 20 / (4 * 5 * 2)}  # spikes / (neurons * T * decisions)
    assert counts.sops == {"fc2": 20 * 2}
    assert counts.macs == {"fc1": 2 * 3 * 4}  # analog vector input, once per decision
    assert counts.neuron_updates == {"fc1": 2 * 4 * 5}


def test_measuring_an_untrained_policy_leaves_its_weights_and_mode_alone():
    # SpikingPolicy calibrates an init="firing" network on its first forward in training mode: a
    # measurement must not be that forward (it would rescale the weights on a random observation).
    from stable_baselines3 import DQN

    model = DQN("SpikingPolicy", "CartPole-v1", policy_kwargs=dict(num_steps=4, net_arch=[8]))
    q_net = model.policy.q_net
    assert q_net.training and q_net.needs_calibration
    before = {name: value.clone() for name, value in q_net.state_dict().items()}
    meter = EnergyMeter(q_net)
    meter.q_values(torch.rand(3, 4))
    assert meter.counts.decisions == 3
    assert q_net.training and q_net.needs_calibration
    for name, value in q_net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_counts_of_several_forward_passes_add_up():
    net = mlp_dsqn()
    with torch.inference_mode(), net.record() as activity:
        net(torch.rand(2, 3))
        net(torch.rand(3, 3))
    together = count_activity(activity, net.num_steps)
    assert together.decisions == 5
    half = len(activity) // 2
    first, second = count_activity(activity[:half], 5), count_activity(activity[half:], 5)
    assert first + second == together
    with pytest.raises(ValueError, match="num_steps=5 and 4"):
        first + EnergyCounts(num_steps=4)
    with pytest.raises(ValueError, match="expected num_steps=3"):
        count_activity(activity, 3)


@pytest.mark.parametrize(
    ("readout", "spiking_layers", "updates"),
    [
        ("rate", {"fc1"}, 4 * 5),  # fc2 is a plain linear map of the rates
        ("spike", {"fc1", "fc2"}, (4 + 2) * 5),  # DSQN-Spike: the output layer fires too
        ("max_mem", {"fc1"}, (4 + 2) * 5),  # non-spiking output integrators still update
    ],
)
def test_readout_variants(readout, spiking_layers, updates):
    net = mlp_dsqn(readout)
    meter = EnergyMeter(net)
    meter.q_values(torch.rand(1, 3))
    assert set(meter.counts.firing_rate) == spiking_layers
    assert meter.counts.neuron_updates_per_action == updates


def test_ann_macs_of_the_nature_cnn():
    q_net = CnnPolicy(FRAMES, PONG_ACTIONS, lr_schedule=lambda _: 1e-4).q_net
    expected = {
        "conv1": CONV1_MACS,
        "conv2": CONV2_MACS,
        "conv3": CONV3_MACS,
        "fc1": FC1_MACS,
        "fc2": FC2_MACS,
    }
    assert ann_layer_macs(q_net) == expected
    assert ann_macs(q_net) == NATURE_MACS == 9_346_048
    # The spiking network's ANN twin has the same synapse shapes.
    assert ann_layer_macs(nature_dsqn()) == expected


def test_ann_macs_of_an_mlp_policy():
    q_net = MlpPolicy(spaces.Box(-1.0, 1.0, (4,)), spaces.Discrete(2), lr_schedule=lambda _: 1e-4).q_net
    assert ann_macs(q_net) == 4 * 64 + 64 * 64 + 64 * 2  # SB3's default net_arch [64, 64]


def test_an_ann_meter_charges_all_macs_and_has_ratio_one():
    q_net = CnnPolicy(FRAMES, PONG_ACTIONS, lr_schedule=lambda _: 1e-4).q_net
    meter = EnergyMeter(q_net)
    meter.q_values(frames(2).float())
    report = meter.report()
    assert report.num_steps is None
    assert report.firing_rate == {}
    assert report.spikes_per_action == report.sops_per_action == 0
    assert report.macs_per_action == NATURE_MACS
    assert report.energy_pj_per_action == report.ann_energy_pj_per_action
    assert report.energy_ratio == 1.0


def test_energy_model_presets():
    horowitz = ENERGY_MODELS["45nm"]
    assert (horowitz.pj_per_mac, horowitz.pj_per_sop, horowitz.pj_per_neuron_update) == (4.6, 0.9, None)
    loihi = load_energy_model("loihi")
    assert (loihi.pj_per_mac, loihi.pj_per_sop, loihi.pj_per_neuron_update) == (None, 23.6, 81.0)
    assert "Davies" in loihi.source and "14 nm" in loihi.source


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_profiles_load(path):
    model = load_energy_model(path)
    assert model.source and model.pj_per_sop > 0


def test_a_yaml_profile(tmp_path):
    path = tmp_path / "chip.yaml"
    path.write_text(
        "name: my-chip\n"
        "source: datasheet table 3\n"
        "pj_per_mac: 2.0\n"
        "pj_per_sop: 0.5\n"
        "pj_per_neuron_update: 1.5\n"
    )
    model = load_energy_model(str(path))
    assert model == EnergyModel("my-chip", "datasheet table 3", 2.0, 0.5, 1.5)
    counts = EnergyCounts(
        num_steps=2, decisions=1, macs={"fc1": 10}, sops={"fc2": 4}, neuron_updates={"fc1": 6}
    )
    report = energy_report(counts, path, ann_macs_per_action=20)
    assert report.energy_pj_per_action == 2.0 * 10 + 0.5 * 4 + 1.5 * 6
    assert report.energy_ratio == (2.0 * 10 + 0.5 * 4 + 1.5 * 6) / (2.0 * 20)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("- name: x\n", "expected a mapping"),
        ("name: x\nsource: s\npj_per_mac: 1\n", "missing field.*pj_per_sop"),
        ("name: x\nsource: s\npj_per_mac: 1\npj_per_sop: 1\nvoltage: 1\n", "unknown field.*voltage"),
        ("name: x\nsource: s\npj_per_mac: 1\npj_per_sop: -0.5\n", "pj_per_sop=-0.5 must be a finite"),
        ("name: x\nsource: s\npj_per_mac: fast\npj_per_sop: 1\n", "pj_per_mac='fast' must be a finite"),
        ("name: x\nsource: s\npj_per_mac: 1\npj_per_sop: null\n", "pj_per_sop=None must be a finite"),
        ("name: x\nsource: ''\npj_per_mac: 1\npj_per_sop: 1\n", "source='' must be a non-empty"),
    ],
)
def test_bad_yaml_profiles_are_rejected_by_name(tmp_path, text, error):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        load_energy_model(path)


def test_unknown_energy_model_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown energy model '65nm'; allowed: 45nm, loihi"):
        load_energy_model("65nm")


# The flat form of an energy report (the energy keys of evaluation.json), key by key and in this order.
REPORT_KEYS = [
    "energy_model", "num_steps", "decisions", "firing_rate", "mean_firing_rate", "spikes_per_layer",
    "spikes_per_action", "sops_per_layer", "sops_per_action", "macs_per_layer", "macs_per_action",
    "neuron_updates_per_action", "energy_breakdown_pj", "energy_pj_per_action", "ann_macs_per_action",
    "ann_energy_pj_per_action", "energy_ratio", "assumptions",
]  # fmt: skip


@pytest.mark.parametrize("model", ["45nm", "loihi"])
def test_a_report_reads_back_from_its_flat_form(model):
    net = silent(nature_dsqn())
    constant_current(net, "fc1", 10.0)
    report = measure(net, frames(2), model)
    flat = report.to_dict()
    assert list(flat) == REPORT_KEYS
    assert flat["energy_model"] == {
        "name": model,
        "source": ENERGY_MODELS[model].source,
        "pj_per_mac": ENERGY_MODELS[model].pj_per_mac,
        "pj_per_sop": ENERGY_MODELS[model].pj_per_sop,
        "pj_per_neuron_update": ENERGY_MODELS[model].pj_per_neuron_update,
        "description": ENERGY_MODELS[model].description,
    }
    assert EnergyReport.from_dict(json.loads(json.dumps(flat))) == report


def test_a_flat_report_without_a_key_names_it():
    flat = measure(silent(nature_dsqn()), frames(1)).to_dict()
    del flat["macs_per_layer"]
    with pytest.raises(ValueError, match="energy report: missing key.*macs_per_layer"):
        EnergyReport.from_dict(flat)
