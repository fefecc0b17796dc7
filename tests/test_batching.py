"""Dynamic batching and the versions' traffic rule, without Ray: plain asyncio. (Over real HTTP: test_serve.py.)"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from skin_ray.serve.batching import Batcher, ImageBudget, Overloaded
from skin_ray.serve.errors import Refusal
from skin_ray.serve.versions import ServedModel, Versions


class Model:
    """Answers each image with its own value; records the batches it was given."""

    def __init__(self, fail: bool = False):
        self.batches: list[list[int]] = []
        self.fail = fail

    async def predict(self, pixels: np.ndarray) -> list[dict]:
        self.batches.append([int(value) for value in pixels[:, 0]])
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("the model failed")
        return [{"value": int(value)} for value in pixels[:, 0]]


def _decoding(value: int, delay_s: float = 0.0):
    async def decode():
        await asyncio.sleep(delay_s)
        if value < 0:
            raise ValueError("undecodable")
        return np.array([value])

    return decode


def _batcher(model: Model, max_batch_size=4, max_wait_s=60.0, most=64) -> Batcher:
    return Batcher(model.predict, max_batch_size, max_wait_s, ImageBudget(most), "v1")


def test_a_lone_image_does_not_wait_for_the_batch_timer():
    """The timer is 60 s; an image nobody else is decoding beside goes to the model at once."""
    model = Model()
    answer = asyncio.run(asyncio.wait_for(_batcher(model).classify(_decoding(7)), timeout=10))
    assert answer == {"value": 7} and model.batches == [[7]]


def test_images_decoding_together_share_batches_of_at_most_the_size():
    model = Model()
    batcher = _batcher(model)

    async def together():
        return await asyncio.gather(*(batcher.classify(_decoding(value, 0.001 * value)) for value in range(10)))

    answers = asyncio.run(asyncio.wait_for(together(), timeout=10))
    assert [answer["value"] for answer in answers] == list(range(10))  # each gets its own answer
    assert sorted(value for batch in model.batches for value in batch) == list(range(10))
    assert max(map(len, model.batches)) == 4 and len(model.batches) == 3  # full batches, not one per image
    assert batcher._loop_task.done() and batcher.budget.held == 0  # nothing left running or held


def test_a_full_budget_refuses_and_frees_its_places():
    model = Model()
    budget = ImageBudget(2)
    first, second = (Batcher(model.predict, 4, 0.01, budget, name) for name in ("a", "b"))  # one budget, two versions

    async def over_the_budget():
        held = [asyncio.ensure_future(batcher.classify(_decoding(1, 0.2))) for batcher in (first, second)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await first.classify(_decoding(2))
        await asyncio.gather(*held)
        return await first.classify(_decoding(3))

    assert asyncio.run(asyncio.wait_for(over_the_budget(), timeout=10)) == {"value": 3}
    assert budget.held == 0


def test_a_failed_batch_fails_its_requests_and_the_next_batch_is_answered():
    model = Model(fail=True)
    batcher = _batcher(model, max_wait_s=0.01)

    async def fail_then_recover():
        outcomes = await asyncio.gather(*(batcher.classify(_decoding(value)) for value in range(3)), return_exceptions=True)
        model.fail = False
        return outcomes, await batcher.classify(_decoding(9))

    outcomes, recovered = asyncio.run(asyncio.wait_for(fail_then_recover(), timeout=10))
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes) and recovered == {"value": 9}


def test_an_image_that_fails_to_decode_does_not_hold_the_others_back():
    model = Model()
    batcher = _batcher(model)

    async def mixed():
        return await asyncio.gather(
            batcher.classify(_decoding(-1, 0.05)), batcher.classify(_decoding(5)), return_exceptions=True
        )

    failed, answered = asyncio.run(asyncio.wait_for(mixed(), timeout=10))
    assert isinstance(failed, ValueError) and answered == {"value": 5}


def _versions(weights: dict[str, float], shadow: dict[str, float] | None = None) -> Versions:
    names = [*weights, *(shadow or {})]
    models = {name: ServedModel(name, None, 96, ["Cancer", "Non_Cancer"], None, None, None) for name in names}
    return Versions(models, weights, shadow or {})


def test_traffic_is_split_by_weight_within_binomial_noise():
    versions = _versions({"stable": 80, "canary": 20})
    drawn = sum(versions.answering(None, None).name == "canary" for _ in range(4000))
    assert abs(drawn - 800) < 4 * math.sqrt(4000 * 0.2 * 0.8)  # four standard deviations


def test_a_caller_always_gets_the_same_version_and_callers_spread_by_weight():
    versions = _versions({"stable": 80, "canary": 20})
    for caller in ("clinic-a", "lab.b", "x-client-17"):
        assert len({versions.answering(None, caller).name for _ in range(50)}) == 1
    canary_callers = sum(versions.answering(None, f"caller-{i}").name == "canary" for i in range(4000))
    assert abs(canary_callers - 800) < 4 * math.sqrt(4000 * 0.2 * 0.8)


def test_a_pinned_version_answers_and_an_unknown_one_is_a_404():
    versions = _versions({"stable": 100}, shadow={"candidate": 100})
    assert {versions.answering("candidate", "clinic-a").name for _ in range(20)} == {"candidate"}
    with pytest.raises(Refusal) as refused:
        versions.answering("nope", None)
    assert refused.value.status == 404 and "stable" in refused.value.detail


def test_shadows_get_their_share_and_never_answer():
    versions = _versions({"stable": 100}, shadow={"candidate": 25})
    assert {versions.answering(None, None).name for _ in range(200)} == {"stable"}
    copies = sum(bool(versions.shadowing()) for _ in range(4000))
    assert abs(copies - 1000) < 4 * math.sqrt(4000 * 0.25 * 0.75)
