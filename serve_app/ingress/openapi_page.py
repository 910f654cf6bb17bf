"""`GET /docs`: the OpenAPI document rendered as one plain HTML page, on the server.

No script and nothing fetched from elsewhere (a server may have no internet): operations grouped
by tag, their fields, responses and schemas as tables, and a curl example for the edit route.
"""

from __future__ import annotations

import html
import re
from typing import Any

# OpenAPI extension keys of `info` (the x- prefix is the spec's room for them): the model's source.
MODEL_SOURCE_KEY = "x-model-source"
RANDOM_WEIGHTS_KEY = "x-random-weights"

_CODE = re.compile(r"`([^`]+)`")
_EMPHASIS = re.compile(r"\*([^*\s][^*]*)\*")

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:980px;margin:0 auto;padding:1rem;color:#1d2330}
h1{margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #d9dde5}
h3{margin:1.6rem 0 .3rem;font-size:1.05rem}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em}
pre{background:#f4f5f7;padding:.7rem;overflow-x:auto;border-radius:6px}
table{border-collapse:collapse;width:100%;margin:.4rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #d9dde5;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f5f7}.method{font-weight:700;text-transform:uppercase;margin-right:.4rem}
.tag{color:#5d6676}.open{color:#137a3a;font-size:.85rem}a{color:#4b3fd6}
@media (prefers-color-scheme:dark){body{background:#14161b;color:#e7e9ee}
pre,th{background:#1e2128}th,td{border-color:#343946}a{color:#8c82ff}}
"""


def _text(value: str) -> str:
    """Escape, then the little markdown the descriptions use: `code` and *emphasis*."""
    escaped = html.escape(value)
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    return _EMPHASIS.sub(r"<em>\1</em>", escaped)


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A schema as a short HTML phrase: `integer, 1..4`, `file`, a link to a component, ..."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f'<a href="#schema-{name}">{html.escape(name)}</a>'
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " or ".join(_type(option) for option in schema[key])
    if "const" in schema:
        return f"<code>{html.escape(repr(schema['const']).strip(chr(39)))}</code>"
    if "contentMediaType" in schema:
        return "file"
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(kind)
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    parts = [html.escape(str(kind))]
    if "enum" in schema:
        values = ", ".join(f"<code>{html.escape(str(v))}</code>" for v in schema["enum"])
        parts.append(f"one of {values}")
    low = schema.get("minimum")
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if low is not None or high is not None:
        parts.append(f"{'' if low is None else low}..{'' if high is None else high}")
    if "maxLength" in schema:
        parts.append(f"at most {schema['maxLength']} characters")
    return ", ".join(parts)


def _fields_table(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = []
    for name, field in schema.get("properties", {}).items():
        default = field.get("default")
        rows.append(
            "<tr>"
            f"<td><code>{html.escape(name)}</code>{' (required)' if name in required else ''}</td>"
            f"<td>{_type(field)}</td>"
            f"<td>{'' if default is None else f'<code>{html.escape(str(default))}</code>'}</td>"
            f"<td>{_text(field.get('description', ''))}</td>"
            "</tr>"
        )
    if not rows:
        return "<p>Any JSON object.</p>"
    head = "<tr><th>field</th><th>type</th><th>default</th><th>meaning</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _responses(op: dict[str, Any], components: dict[str, Any]) -> str:
    rows = []
    for status, response in op["responses"].items():
        resolved = response
        if "$ref" in response:
            resolved = {**components["responses"][_ref_name(response["$ref"])], **response}
        content = resolved.get("content", {})
        media = "; ".join(
            f"<code>{html.escape(kind)}</code>: {_type(body.get('schema', {}))}"
            for kind, body in content.items()
        )
        rows.append(
            f"<tr><td>{html.escape(status)}</td><td>{_text(resolved.get('description', ''))}</td>"
            f"<td>{media}</td></tr>"
        )
    head = "<tr><th>status</th><th>meaning</th><th>body</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _operation(path: str, method: str, op: dict[str, Any], doc: dict[str, Any]) -> str:
    components = doc["components"]
    anchor = html.escape(op["operationId"])
    out = [
        f'<h3 id="{anchor}"><span class="method">{method}</span><code>{html.escape(path)}</code>'
        f" — {html.escape(op['summary'])}</h3>"
    ]
    if op.get("security") == [] and doc.get("security"):
        out.append('<p class="open">Answered without an API key.</p>')
    if op.get("description"):
        out.append(f"<p>{_text(op['description'])}</p>")
    params = op.get("parameters", [])
    if params:
        items = "".join(
            f"<li><code>{html.escape(p['name'])}</code> ({p['in']}):"
            f" {_text(p.get('description', ''))}</li>"
            for p in params
        )
        out.append(f"<p>Parameters:</p><ul>{items}</ul>")
    body = op.get("requestBody")
    if body:
        for kind, content in body["content"].items():
            schema = content["schema"]
            if "$ref" in schema:
                schema = components["schemas"][_ref_name(schema["$ref"])]
            out.append(f"<p>Body: <code>{html.escape(kind)}</code></p>{_fields_table(schema)}")
    out.append(_responses(op, components))
    return "".join(out)


# The example's steps, within this server's generation.max_steps (20 in `make run`): an example
# the server itself refuses is worse than none.
EXAMPLE_STEPS = 20


def _example_steps(doc: dict[str, Any]) -> int:
    form = doc["components"]["schemas"]["ImageEditRequest"]["properties"]
    return min(EXAMPLE_STEPS, int(form["num_inference_steps"].get("maximum", EXAMPLE_STEPS)))


def _example(doc: dict[str, Any]) -> str:
    key = ' -H "Authorization: Bearer $KEY"' if doc.get("security") else ""
    return (
        "<pre>curl -s http://127.0.0.1:8000/v1/images/edits"
        f"{html.escape(key)} \\\n"
        '  -F image=@input.png -F prompt="make the sky purple" -F size=1024x1024 \\\n'
        f"  -F num_inference_steps={_example_steps(doc)} -F seed=7 \\\n"
        '  | python3 -c "import sys,json,base64; '
        "open('out.png','wb').write(base64.b64decode(json.load(sys.stdin)['data'][0]['b64_json']))\""
        "</pre>"
    )


def _real_model(doc: dict[str, Any]) -> str:
    """Which weights this server runs and, since random ones make noise, how to serve the real
    model: the playground's demo notice links here."""
    source = str(doc["info"].get(MODEL_SOURCE_KEY, "local"))
    if doc["info"].get(RANDOM_WEIGHTS_KEY):
        state = (
            f"<p><strong>This server runs random weights (model source <code>{html.escape(source)}"
            "</code>): every image it makes is noise.</strong> The embedded tiny model of"
            " <code>make run</code> is a demo of the API that runs without a GPU.</p>"
        )
    else:
        shown = html.escape(source)
        state = f"<p>This server runs its model's weights (source <code>{shown}</code>).</p>"
    return (
        f'<h2 id="real-model">Serving the real model</h2>{state}'
        "<p>On a machine with an NVIDIA GPU of 80 GB or more, in a clone of the repository:</p>"
        "<pre>python3 -m venv .venv\n"
        ".venv/bin/pip install -c deploy/constraints-gpu.txt -e '.[serve]'\n"
        ".venv/bin/serve run serve_config.yaml</pre>"
        "<p><code>serve_config.yaml</code> downloads <code>Qwen/Qwen-Image-Edit-2511</code> from"
        " Hugging Face on its first start; <code>deploy/configs/</code> holds a config per GPU"
        " shape (the README's table, <code>docs/gpu.md</code>).</p>"
    )


def render_page(doc: dict[str, Any]) -> str:
    info = doc["info"]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            by_tag.setdefault(op["tags"][0], []).append((path, method, op))
    tags = {t["name"]: t.get("description", "") for t in doc.get("tags", [])}
    index = "".join(
        f'<li><a href="#{html.escape(op["operationId"])}">{method.upper()} '
        f"{html.escape(path)}</a> — {html.escape(op['summary'])}</li>"
        for ops in by_tag.values()
        for path, method, op in ops
    )
    sections = "".join(
        f'<h2>{html.escape(tag)} <span class="tag">{html.escape(tags.get(tag, ""))}</span></h2>'
        + "".join(_operation(path, method, op, doc) for path, method, op in ops)
        for tag, ops in by_tag.items()
    )
    schemas = "".join(
        f'<h3 id="schema-{html.escape(name)}">{html.escape(name)}</h3>'
        + (f"<p>{_text(s['description'])}</p>" if s.get("description") else "")
        + (_fields_table(s) if "properties" in s else f"<p>{_type(s)}</p>")
        for name, s in doc["components"]["schemas"].items()
    )
    auth = (
        "<p>This server needs an API key: <code>Authorization: Bearer &lt;key&gt;</code>"
        " (the openai clients' <code>api_key</code>).</p>"
        if doc.get("security")
        else "<p>API keys are off on this server.</p>"
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(info['title'])} API</title>"
        '<link rel="icon" href="favicon.ico" type="image/svg+xml">'
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(info['title'])} API</h1>"
        f"<p>Version {html.escape(info['version'])} · OpenAPI {html.escape(doc['openapi'])}:"
        ' <a href="openapi.json">openapi.json</a> · <a href="./">playground</a></p>'
        f"<p>{_text(info.get('description', ''))}</p>{auth}"
        f"<h2>Example</h2>{_example(doc)}{_real_model(doc)}<h2>Routes</h2><ul>{index}</ul>"
        f"{sections}<h2>Schemas</h2>{schemas}</body></html>"
    )
