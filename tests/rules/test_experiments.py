"""Experiment assignment: deterministic, uniform, reshuffled by the salt, independent across
experiments; scopes; what an arm does to the knobs; the policy section's validation."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from scipy.stats import chi2_contingency

from rules.constraints import compile_policy
from rules.errors import PolicyError
from rules.experiments import arm_index, arm_indexes, arm_policy, assign
from rules.policy import Experiment, ExperimentsPolicy, load_policy, parse_policy
from tests.rules.builders import catalog, item

IDS = [f"customer-{number}" for number in range(100_000)]


def experiment(
    name: str = "exp", salt: str = "s1", shares: tuple[float, ...] = (0.5, 0.5)
) -> Experiment:
    return Experiment.model_validate(
        {
            "name": name,
            "salt": salt,
            "arms": [
                {"name": f"arm{position}", "share": share, "strategy": "policy"}
                for position, share in enumerate(shares)
            ],
        }
    )


def test_assignment_is_deterministic_and_sticky() -> None:
    """The same unit lands in the same arm on every call, and a vectorised call agrees."""
    test = experiment(shares=(0.2, 0.3, 0.5))
    first = arm_indexes(test, IDS[:5000])
    again = arm_indexes(test, IDS[:5000])
    assert np.array_equal(first, again)
    assert [arm_index(test, unit) for unit in IDS[:200]] == first[:200].tolist()
    assert set(first.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.1, 0.9), (0.2, 0.3, 0.5), (0.05, 0.15, 0.8)])
def test_split_within_one_percent_over_100k_ids(shares: tuple[float, ...]) -> None:
    """Over 100k ids every arm's share is within 1 percentage point of the configured one."""
    counts = np.bincount(arm_indexes(experiment(shares=shares), IDS), minlength=len(shares))
    observed = counts / len(IDS)
    assert np.all(np.abs(observed - np.array(shares)) < 0.01), observed


def test_changing_the_salt_reshuffles() -> None:
    """A new salt draws afresh: on a 50/50 split about half of the units change arm (a
    reshuffle, not a shift), and the split itself still holds."""
    before = arm_indexes(experiment(salt="spring"), IDS)
    after = arm_indexes(experiment(salt="summer"), IDS)
    agreement = float(np.mean(before == after))
    assert abs(agreement - 0.5) < 0.01
    assert abs(float(np.mean(after)) - 0.5) < 0.01


def test_independent_across_experiments() -> None:
    """A unit's arm in one experiment says nothing about its arm in another, even with the
    same salt: the joint split is the product of the marginals (chi-square, and every cell
    within 1 point of it)."""
    first = arm_indexes(experiment(name="checkout-upsell", salt="q1"), IDS)
    second = arm_indexes(experiment(name="pdp-bundles", salt="q1", shares=(0.3, 0.7)), IDS)
    table = np.zeros((2, 2))
    np.add.at(table, (first, second), 1)
    _, p_value, _, _ = chi2_contingency(table)
    assert p_value > 0.001
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / len(IDS)
    assert np.all(np.abs(table - expected) / len(IDS) < 0.01)
    # The same name and salt are one experiment: identical arms (the test has teeth).
    assert np.array_equal(first, arm_indexes(experiment(name="checkout-upsell", salt="q1"), IDS))


def experiments_policy(**scope: object) -> ExperimentsPolicy:
    return ExperimentsPolicy.model_validate(
        {
            "store_clusters": {"north": ["S-1", "S-2"], "south": ["S-9"]},
            "running": [
                {
                    "name": "scoped",
                    "salt": "x",
                    "scope": scope,
                    "arms": [
                        {"name": "control", "share": 0.5, "strategy": "holdout"},
                        {"name": "treatment", "share": 0.5, "strategy": "policy"},
                    ],
                },
                {
                    "name": "everything-else",
                    "salt": "y",
                    "arms": [
                        {"name": "a", "share": 0.5, "strategy": "relevance"},
                        {
                            "name": "b",
                            "share": 0.5,
                            "strategy": "margin_weight",
                            "margin_weight": 0.8,
                        },
                    ],
                },
            ],
        }
    )


@pytest.mark.parametrize(
    ("scope", "request_facts", "joined"),
    [
        ({"channels": ["pos"]}, {"channel": "pos", "store_id": "S-1"}, "scoped"),
        ({"channels": ["pos"]}, {"channel": "cart"}, "everything-else"),
        ({"categories": ["TOYS"]}, {"channel": "cart", "categories": ("TOYS", "GIFTS")}, "scoped"),
        (
            {"categories": ["TOYS"]},
            {"channel": "cart", "categories": ("GIFTS",)},
            "everything-else",
        ),
        ({"store_clusters": ["north"]}, {"channel": "pos", "store_id": "S-2"}, "scoped"),
        ({"store_clusters": ["north"]}, {"channel": "pos", "store_id": "S-9"}, "everything-else"),
        ({"store_clusters": ["north"]}, {"channel": "cart"}, "everything-else"),
    ],
)
def test_scope_decides_which_experiment_a_request_joins(
    scope: dict[str, object], request_facts: dict[str, object], joined: str
) -> None:
    """The first experiment whose scope matches takes the request; the next one gets the rest."""
    facts = {"categories": (), "store_id": None, **request_facts}
    found = assign(
        experiments_policy(**scope),
        customer_id="c-1",
        session_id=None,
        **facts,  # type: ignore[arg-type]
    )
    assert found is not None
    assert found.experiment == joined


def test_unit_is_the_customer_else_the_session_else_none() -> None:
    policy = experiments_policy()
    by_customer = assign(
        policy, channel="cart", categories=(), store_id=None, customer_id="c-7", session_id="s-1"
    )
    assert by_customer is not None
    assert by_customer.unit == "customer"
    by_session = assign(
        policy, channel="cart", categories=(), store_id=None, customer_id=None, session_id="s-1"
    )
    assert by_session is not None
    assert by_session.unit == "session"
    assert (
        assign(
            policy, channel="cart", categories=(), store_id=None, customer_id=None, session_id=None
        )
        is None
    )
    assert (
        assign(
            ExperimentsPolicy(),
            channel="cart",
            categories=(),
            store_id=None,
            customer_id="c-7",
            session_id=None,
        )
        is None
    )


def test_arm_policy_overrides_only_the_knob_weights() -> None:
    """relevance: every weight 0; margin_weight: every weight the arm's; policy and holdout:
    the compiled policy itself. Floors are untouched."""
    compiled = compile_policy(load_policy(), catalog([item("A"), item("B", category="TOYS")]))
    policy = experiments_policy(channels=["cart"])  # pdp requests join the second experiment
    arms = {}
    for unit in IDS[:50]:
        found = assign(
            policy, channel="cart", categories=(), store_id=None, customer_id=unit, session_id=None
        )
        assert found is not None
        arms[found.arm] = found
    assert {"control", "treatment"} <= set(arms)
    assert arm_policy(compiled, arms["treatment"]) is compiled
    assert arm_policy(compiled, arms["control"]) is compiled
    assert arms["control"].shows_nothing
    assert arm_policy(compiled, None) is compiled
    others = {}
    for unit in IDS[:50]:
        found = assign(
            policy, channel="pdp", categories=(), store_id=None, customer_id=unit, session_id=None
        )
        assert found is not None
        others[found.arm] = found
    relevance = arm_policy(compiled, others["a"])
    fixed = arm_policy(compiled, others["b"])
    assert np.all(relevance.margin_weight == 0.0)
    assert np.all(fixed.margin_weight == 0.8)
    assert np.array_equal(fixed.floor_absolute, compiled.floor_absolute)
    assert np.any(compiled.margin_weight != 0.8)  # the default policy is not already 0.8


def policy_text(experiments: object) -> str:
    document = load_policy().model_dump(mode="json")
    document["experiments"] = experiments
    return yaml.safe_dump(document)


def arm(name: str, share: float, strategy: str = "policy", **extra: object) -> dict[str, object]:
    return {"name": name, "share": share, "strategy": strategy, **extra}


@pytest.mark.parametrize(
    ("experiments", "named"),
    [
        (
            {"running": [{"name": "e", "salt": "s", "arms": [arm("a", 0.5), arm("b", 0.4)]}]},
            "sum to 1",
        ),
        (
            {"running": [{"name": "e", "salt": "s", "arms": [arm("a", 0.5), arm("a", 0.5)]}]},
            "unique",
        ),
        (
            {"running": [{"name": "e", "salt": "s", "arms": [arm("a", 1.0)]}]},
            "experiments.running.0.arms",
        ),
        (
            {
                "running": [
                    {
                        "name": "e",
                        "salt": "s",
                        "arms": [arm("a", 0.5, "margin_weight"), arm("b", 0.5)],
                    }
                ]
            },
            "required by strategy margin_weight",
        ),
        (
            {
                "running": [
                    {
                        "name": "e",
                        "salt": "s",
                        "arms": [arm("a", 0.5, margin_weight=0.3), arm("b", 0.5)],
                    }
                ]
            },
            "only strategy margin_weight",
        ),
        (
            {
                "running": [
                    {
                        "name": "e",
                        "salt": "s",
                        "control": "z",
                        "arms": [arm("a", 0.5), arm("b", 0.5)],
                    }
                ]
            },
            "control",
        ),
        (
            {
                "running": [
                    {"name": "e", "salt": "s", "arms": [arm("a", 0.5), arm("b", 0.5)]},
                    {"name": "e", "salt": "t", "arms": [arm("a", 0.5), arm("b", 0.5)]},
                ]
            },
            "experiment names must be unique",
        ),
        (
            {
                "running": [
                    {
                        "name": "e",
                        "salt": "s",
                        "scope": {"store_clusters": ["west"]},
                        "arms": [arm("a", 0.5), arm("b", 0.5)],
                    }
                ]
            },
            "unknown cluster(s) west",
        ),
        (
            {"running": [{"name": "E!", "salt": "s", "arms": [arm("a", 0.5), arm("b", 0.5)]}]},
            "name",
        ),
        ({"running": [{"name": "e", "salt": "", "arms": [arm("a", 0.5), arm("b", 0.5)]}]}, "salt"),
        ({"attribution_window_hours": 0}, "attribution_window_hours"),
    ],
)
def test_invalid_experiments_are_refused_naming_the_field(experiments: object, named: str) -> None:
    with pytest.raises(PolicyError, match=r"exp\.yaml") as caught:
        parse_policy(policy_text(experiments), source="exp.yaml")
    assert named in str(caught.value)


def test_experiments_enter_the_policy_hash() -> None:
    """A new salt is a new policy version: the responses say which one they ran under."""
    base = {"running": [{"name": "e", "salt": "s", "arms": [arm("a", 0.5), arm("b", 0.5)]}]}
    salted = {"running": [{"name": "e", "salt": "t", "arms": [arm("a", 0.5), arm("b", 0.5)]}]}
    first = parse_policy(policy_text(base), source="a").content_hash
    assert first == parse_policy(policy_text(base), source="b").content_hash
    assert first != parse_policy(policy_text(salted), source="c").content_hash
    assert first != load_policy().content_hash


def test_documented_examples_are_valid_policies() -> None:
    """The experiments block of docs/experiments.md and the commented one in the default
    policy both validate, so the documentation cannot drift from the schema."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    doc = (repo / "docs" / "experiments.md").read_text("utf-8")
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    documented = yaml.safe_load(block)["experiments"]
    parse_policy(policy_text(documented), source="docs/experiments.md")
    default = (repo / "rules" / "policies" / "default.yaml").read_text("utf-8")
    commented = default.split("  # running:\n", 1)[1]
    running = yaml.safe_load(
        "\n".join(line.replace("  # ", "  ", 1) for line in commented.splitlines())
    )
    parse_policy(policy_text({"running": running}), source="default.yaml (commented)")
