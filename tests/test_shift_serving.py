"""Unfamiliar inputs and the shift monitor in the server (issue 26): every /predict answer carries its conformal
unfamiliarity p-value, the policy decides with it, and each adapter's monitor sees the stream (fake backend)."""

from __future__ import annotations

import numpy as np

from adapters.shift import Reference
from adapters.uncertainty import summarize
from server.backend import ScoreRequest
from tests.fake_backend import logits_for
from tests.test_service_fake import CHOICES, item, run


def _reference_record(n: int = 200, seed: int = 0) -> dict:
    """A decision block whose calibration reference is the fake backend's own scores of n questions (so requests
    like them are in distribution), with an unfamiliarity rule that applies to everything below α_u."""
    eps, ents = [], []
    for i in range(n):
        lg = logits_for(ScoreRequest("fake", "q" * (1 + i % 40), tuple(CHOICES), None, 4, 1000 + i))
        s = summarize(lg[:, None, :])
        eps.append(float(s["epistemic_norm"][0]))
        ents.append(float(s["entropy_norm"][0]))
    ref = Reference(np.array(eps), np.array(ents)).to_record()
    policy = {"valid": True, "min_confidence": None, "max_epistemic": None, "target_error": 0.3, "delta": 0.1}
    policy["unfamiliar"] = {
        "alpha": 0.05,
        "min_confidence": 1.01,
        "max_epistemic": None,
    }  # unfamiliar → abstain
    return {"method": "dalorra", "default_samples": 4, "decision": {"policy": policy, "reference": ref}}


def test_every_answer_carries_unfamiliarity_and_the_monitor_counts_it(tmp_path):
    async def body(service, backend, metrics):
        out = await service.predict([item("q" * 7, seed=5000 + i, samples=4) for i in range(20)])
        us = [o.unfamiliarity for o in out]
        assert all(u is not None and 1 / 201 <= u <= 1 for u in us)
        for o in out:  # the rule: unfamiliar (below 0.05) and failing the strict rule (always) → abstain
            assert (o.abstain_reason == "unfamiliar") == (o.unfamiliarity < 0.05)
        rec = service.registry.get("fake")
        st = rec.shift()
        assert st["observed"] == 20 and st["unfamiliar"] == sum(u < 0.05 for u in us)
        assert abs(st["accuracy_estimate"] - np.mean([o.confidence for o in out])) < 1e-12
        assert service.registry.describe("fake").shift["observed"] == 20  # /v1/adapters/{name} shows it
        hist = metrics.registry.get_sample_value("dalorra_unfamiliarity_count", {"adapter": "fake"})
        assert hist == 20
        assert (
            metrics.registry.get_sample_value("dalorra_shift_statistic", {"adapter": "fake"})
            == st["statistic"]
            == max(st["components"].values())
        )
        for name, value in st["components"].items():
            got = metrics.registry.get_sample_value(
                "dalorra_shift_component_statistic", {"adapter": "fake", "component": name}
            )
            assert got == value

    run(tmp_path, body, record=_reference_record())


def test_a_shifted_stream_raises_the_alarm_and_in_distribution_traffic_does_not(tmp_path):
    async def body(service, backend, metrics):
        await service.predict([item("q" * (1 + i % 40), seed=9000 + i, samples=4) for i in range(60)])
        assert not service.registry.get("fake").shift()["alarm"]
        # A shift: one sample per request (MI 0, far below every calibration item's) on questions of a new shape.
        for i in range(80):
            await service.predict([item("shifted question " * 3, seed=i, samples=1)])
        st = service.registry.get("fake").shift()
        assert st["alarm"] and st["statistic"] >= st["threshold"] and st["alarm_by"] in st["components"]
        assert metrics.registry.get_sample_value("dalorra_shift_alarm", {"adapter": "fake"}) == 1

    run(tmp_path, body, record=_reference_record())


def _after_an_alarm(service) -> list:
    """Raise the fake adapter's alarm with a shifted stream, then ask in-distribution-like questions."""

    async def go():
        for i in range(80):
            await service.predict([item("shifted question " * 3, seed=i, samples=1)])
        assert service.registry.get("fake").shift()["alarm"]
        return await service.predict([item("q" * (1 + i % 40), seed=7000 + i, samples=4) for i in range(20)])

    return go()


def test_a_raised_alarm_puts_every_request_under_the_strict_rule(tmp_path):
    """DALORRA_SHIFT_ACTION=strict (the default): once the alarm is up, a familiar request that fails the adapter's
    strict rule (here every request does) abstains with reason `shift_alarm`; an unfamiliar one keeps its own."""

    async def body(service, backend, metrics):
        out = await _after_an_alarm(service)
        for o in out:
            assert o.decision == "abstain"
            assert o.abstain_reason == ("unfamiliar" if o.unfamiliarity < 0.05 else "shift_alarm")
        assert any(o.abstain_reason == "shift_alarm" for o in out)
        got = metrics.registry.get_sample_value(
            "dalorra_abstentions_total", {"adapter": "fake", "reason": "shift_alarm"}
        )
        assert got == sum(o.abstain_reason == "shift_alarm" for o in out)
        await service.registry.load("fake")  # the operator's reload: a fresh test period, the action lifted
        assert not service.registry.get("fake").shift()["alarm"]
        again = await service.predict([item("q" * 5, seed=7100, samples=4)])
        assert again[0].abstain_reason != "shift_alarm"

    run(tmp_path, body, record=_reference_record())


def test_with_the_alert_action_a_raised_alarm_changes_no_decision(tmp_path):
    async def body(service, backend, metrics):
        out = await _after_an_alarm(service)
        for o in out:
            assert (o.decision == "abstain") == (o.unfamiliarity < 0.05)
            assert o.abstain_reason in (None, "unfamiliar")

    run(tmp_path, body, record=_reference_record(), shift_action="alert")


def test_an_adapter_without_a_reference_answers_without_unfamiliarity(tmp_path):
    async def body(service, backend, metrics):
        out = await service.predict([item("Which colour is the sky?")])
        assert out[0].unfamiliarity is None
        assert (
            service.registry.get("fake").monitor is None and service.registry.describe("fake").shift is None
        )

    run(tmp_path, body)
