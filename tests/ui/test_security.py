"""The UI's guard, over real HTTP: the launch secret (then its cookie), the Host header (DNS
rebinding), cross-origin requests, state changes without the UI's header, loopback only, and
no access log on stdout."""

from __future__ import annotations

import httpx
import pytest
from cloche.ui import start_ui


@pytest.fixture(scope="module")
def web(local_default):
    server = start_ui(local_default, limit=8)
    yield server
    server.stop()


def test_the_launch_url_answers_the_model_page_and_sets_a_strict_cookie(web):
    response = httpx.get(web.url())
    assert response.status_code == 200
    assert "cloche-default" in response.text
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"cloche_ui_{web.port}={web.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_it_listens_on_loopback_only(web):
    assert web.host == "127.0.0.1"
    assert web.url().startswith(f"http://127.0.0.1:{web.port}/model?token=")


@pytest.mark.parametrize("path", ["/model", "/unit?point=embed&unit=0", "/api/contexts",
                                  "/static/app.js", "/api/unit?point=embed&unit=0"])
def test_without_the_token_everything_is_refused(web, path):
    assert httpx.get(web.base + path).status_code == 401
    assert httpx.get(web.base + path + ("&" if "?" in path else "?") + "token=wrong"
                     ).status_code == 401
    assert httpx.get(web.base + path, cookies={f"cloche_ui_{web.port}": "wrong"}
                     ).status_code == 401


def test_the_cookie_is_enough_after_the_first_visit(web):
    with httpx.Client() as client:
        assert client.get(web.url()).status_code == 200
        assert client.get(web.base + "/api/contexts").status_code == 200
        assert client.get(web.base + "/static/app.js").status_code == 200


def test_a_foreign_host_header_is_refused_even_with_the_token(web):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name."""
    response = httpx.get(web.url(), headers={"Host": f"evil.example:{web.port}"})
    assert response.status_code == 403
    assert httpx.get(web.url(), headers={"Host": f"localhost:{web.port}"}).status_code == 200
    assert httpx.get(web.url(), headers={"Host": "127.0.0.1:1"}).status_code == 403


def test_cross_origin_requests_are_refused(web):
    cookies = {f"cloche_ui_{web.port}": web.token}
    url = web.base + "/api/contexts"
    assert httpx.get(url, cookies=cookies, headers={"Origin": "http://evil.example"}
                     ).status_code == 403
    assert httpx.get(url, cookies=cookies, headers={"Origin": "http://127.0.0.1:1"}
                     ).status_code == 403
    assert httpx.get(url, cookies=cookies, headers={"Sec-Fetch-Site": "cross-site"}
                     ).status_code == 403
    assert httpx.get(url, cookies=cookies, headers={"Sec-Fetch-Site": "same-site"}
                     ).status_code == 403
    assert httpx.get(url, cookies=cookies, headers={"Origin": web.base,
                                                    "Sec-Fetch-Site": "same-origin"}
                     ).status_code == 200


def test_state_changes_need_the_ui_header(web, local_default):
    local_default.run("a b c", probes={"embed": lambda c, x: c.save("e", x)}, save="ui-keep")
    cookies = {f"cloche_ui_{web.port}": web.token}
    url = web.base + "/api/contexts/clear"
    assert httpx.post(url, cookies=cookies, json={"name": "ui-keep"}).status_code == 403
    assert "ui-keep" in local_default.save_contexts()
    response = httpx.post(url, cookies=cookies, json={"name": "ui-keep"},
                          headers={"X-Cloche-UI": "1"})
    assert response.status_code == 200
    assert "ui-keep" not in local_default.save_contexts()


def test_bad_input_is_a_clear_error_and_the_ui_keeps_serving(web):
    cookies = {f"cloche_ui_{web.port}": web.token}
    for path, words in [("/api/unit?point=embed&unit=9999", "out of range"),
                        ("/api/unit?point=nowhere&unit=1", "nowhere"),
                        ("/api/unit?point=embed&unit=x", "int"),
                        ("/api/contexts/slice?name=none&key=k&index=__import__", "no key"),
                        ("/api/head/pattern?layer=7&head=0", "layer")]:
        response = httpx.get(web.base + path, cookies=cookies)
        text = response.text
        if response.status_code == 200:  # a stream: the error is its last line
            text = response.text.strip().splitlines()[-1]
            assert '"type": "error"' in text
        else:
            assert response.status_code == 400
        assert words in text
    assert httpx.get(web.base + "/api/contexts", cookies=cookies).status_code == 200


def test_slices_are_parsed_not_evaluated():
    from cloche.errors import UsageError
    from cloche.ui.views.contexts import parse_slice

    assert parse_slice("0, :, 2:10, ::2") == (0, slice(None), slice(2, 10), slice(None, None, 2))
    for bad in ["__import__('os')", "0, a", "1:2:3:4"]:
        with pytest.raises(UsageError):
            parse_slice(bad)


def test_no_access_log_on_stdout(web, capfd):
    capfd.readouterr()
    httpx.get(web.url())
    httpx.get(web.base + "/nowhere")
    out, _ = capfd.readouterr()
    assert out == ""
