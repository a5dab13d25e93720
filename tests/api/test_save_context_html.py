"""Save-context listings and handles show themselves in a notebook (``_repr_html_``), in the
style of the experiments' results, on a local model and through a server."""

from __future__ import annotations

import pickle

import cloche
import cloche.api.html as api_html
import cloche.experiments.html as experiments_html
import pytest

from tests.server.helpers import InProcessServer


def _fill(model: cloche.Model) -> None:
    model.save_context("<acts>").clear()
    for _ in range(2):
        model.run([[5, 6, 7, 8]], save="<acts>",
                  probes={"layers.0.mlp.post": lambda ctx, x: ctx.save("post<&>", x)})


@pytest.fixture(params=["local", "remote"])
def model(request, tiny_model):
    local = tiny_model("gpt2")
    if request.param == "local":
        yield local
    else:
        with InProcessServer(local) as server, cloche.connect(
                server.address, token=server.token) as remote:
            yield remote
    local.save_context("<acts>").clear()


def test_a_handle_shows_runs_keys_size_and_the_fetch_axis(model):
    _fill(model)
    handle = model.save_context("<acts>")
    page = handle._repr_html_()
    assert page.startswith("<table") and "2 run(s), 1 key(s)" in page
    assert "post&lt;&amp;&gt;" in page and "post<&>" not in page  # user text is escaped
    assert "&#x27;&lt;acts&gt;&#x27;" in page  # the context's name, escaped
    assert "new first axis" in page
    assert f"{handle.nbytes} B" in page or "KiB" in page


def test_the_listing_is_a_list_of_names_that_shows_a_table(model):
    _fill(model)
    names = model.save_contexts()
    assert "<acts>" in names and isinstance(names, list)
    assert pickle.loads(pickle.dumps(names)) == list(names)  # travels as a plain list
    page = names._repr_html_()
    assert "save context(s)" in page and "&lt;acts&gt;" in page
    row = page[page.index("&lt;acts&gt;"):]
    assert ">2<" in row[:200] and "post&lt;&amp;&gt;" in row[:300]  # runs and keys


def test_same_style_as_the_experiments_results():
    assert api_html._STYLE == experiments_html._STYLE
    assert api_html._CELL == experiments_html._CELL
    assert api_html.human_bytes(1536) == "1.5 KiB" and api_html.human_bytes(12) == "12 B"
