"""Every example in the docs asks only what `make run` (deploy/local.yaml) accepts: steps, sizes,
n and model. The README's examples also run for real: tests/integration/clients/
test_docs_examples.py."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig, load_config
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from tests.deploy.examples import Example, examples, parse, problems
from tests.deploy.files import LOCAL_CONFIG, README, app, manifest
from tests.fakes import FakeModelHandle

EXAMPLES = list(examples())


def make_run_config() -> AppConfig:
    return load_config(app(manifest(LOCAL_CONFIG))["args"], environ={})


def test_the_examples_are_found() -> None:
    readme = [e for e in EXAMPLES if e.path == README]
    # make run, the curl, the command and the Python client.
    assert [e.language for e in readme] == ["bash", "bash", "bash", "python"]
    assert any(e.steps for e in EXAMPLES) and any(e.sizes for e in EXAMPLES)
    assert any(e.ns for e in EXAMPLES) and any(e.models for e in EXAMPLES)
    assert {e.path.name for e in EXAMPLES} >= {"README.md", "client.md", "api.md"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.where)
def test_every_example_fits_make_runs_limits(example: Example) -> None:
    assert problems(example, make_run_config()) == [], example.code


def test_the_docs_pages_own_example_fits_make_runs_limits() -> None:
    config = make_run_config()
    service = EditService(model=FakeModelHandle(), config=config)
    page = TestClient(create_app(service)).get("/docs").text
    (example,) = re.findall(r"<h2>Example</h2><pre>(.*?)</pre>", page, re.S)
    parsed = parse(example)
    assert parsed.steps and parsed.sizes
    assert problems(parsed, config) == []


def test_the_check_catches_what_make_run_refuses() -> None:
    config = make_run_config()
    assert problems(parse("-F num_inference_steps=40 -F size=1024x1024"), config) == [
        "40 steps > max_steps 20"
    ]
    assert problems(parse("--steps 40 --size 2048x2048 -n 5"), config) == [
        "40 steps > max_steps 20",
        "size 2048x2048 outside 64..1024",
        "n 5 > max_n 4",
    ]
    assert problems(parse('extra_body={"num_inference_steps": 21}, n=2'), config) == [
        "21 steps > max_steps 20"
    ]
    assert problems(parse('model="qwen-image-edit-2511-x"'), config) == [
        "model qwen-image-edit-2511-x not served"
    ]
