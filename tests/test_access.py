"""Who may do what: the admin role, throttled password attempts, allowed model folders and benchmark sizes,
and the pages that apply them (AppTest on the tiny model)."""

import logging

import pytest
from conftest import HOME, open_page

from glm_core.access import (
    USER_BENCH_MAX_GENERATE,
    AttemptThrottle,
    NotAllowed,
    PathNotAllowed,
    RolePolicy,
    check_benchmark,
    check_model_path,
    is_local_client,
    throttle_keys,
)
from glm_core.bench.estimator import PRESETS
from ui.access import get_throttle
from ui.resources import get_hub

MONITOR = "GPU_monitor"
QUANT = "Quantization"
ALICE = {"is_logged_in": True, "sub": "alice-1", "iss": "https://idp.example", "email": "Alice@Example.com"}
BOB = {"is_logged_in": True, "sub": "bob-2", "iss": "https://idp.example", "email": "bob@example.com"}


# ---- the rules ---------------------------------------------------------------------------------------------


def test_without_a_secrets_file_this_machines_browsers_are_admin_and_with_one_only_the_named():
    open_policy = RolePolicy.from_secrets(None)
    assert open_policy.local_admins
    assert "You are an admin" in open_policy.describe(local=True)
    assert "Only browsers on the server's own machine are admins" in open_policy.describe(local=False)
    assert "admin_password" in open_policy.describe(local=False)  # how an admin is configured
    assert "browsers on this machine only" in open_policy.startup_notice()
    policy = RolePolicy.from_secrets({"admins": ["alice@example.com", "https://idp.example|bob-2"]})
    assert not policy.local_admins
    assert policy.is_listed_admin(ALICE)  # by email, any case
    assert policy.is_listed_admin(BOB)  # by identity
    assert not policy.is_listed_admin({**ALICE, "is_logged_in": False})
    assert not policy.is_listed_admin({"is_logged_in": True, "sub": "eve", "iss": "x", "email": "eve@example.com"})
    # A secrets file that names nobody: nobody is admin, and the page says how to name one.
    nobody = RolePolicy.from_secrets({"access_password": "x"})
    assert not nobody.local_admins and not nobody.is_listed_admin(ALICE) and "names no admins" in nobody.describe()


def test_which_client_addresses_are_this_machine():
    """Streamlit gives None for 127.0.0.1 and ::1; a dual-stack listener gives an IPv4 client as ::ffff:a.b.c.d."""
    for local in (None, "127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "localhost"):
        assert is_local_client(local), local
    for remote in ("192.0.2.2", "::ffff:192.0.2.2", "fd00::2", "10.0.0.1", "", "not-an-address", "::"):
        assert not is_local_client(remote), remote


def test_password_attempts_are_throttled_per_session_and_per_client(caplog):
    now = [0.0]
    throttle = AttemptThrottle(max_failures=3, window_s=60, clock=lambda: now[0])
    keys = throttle_keys("a", "10.0.0.1")
    wrong, right = (lambda: False), (lambda: True)
    with caplog.at_level(logging.WARNING, logger="glm_core.access"):
        for _ in range(3):
            assert throttle.attempt(keys, wrong, "access password", "10.0.0.1") is False
    assert throttle.attempt(keys, right, "access password", "10.0.0.1") == 60  # refused unread, even if right
    # A new session from the same client is still refused (a refresh does not reset the count) ...
    assert throttle.attempt(throttle_keys("b", "10.0.0.1"), right, "x", None) == 60
    # ... another client is not.
    assert throttle.attempt(throttle_keys("c", "10.0.0.2"), right, "x", None) is True
    now[0] = 30
    assert throttle.attempt(keys, right, "x", None) == 30
    now[0] = 61
    assert throttle.attempt(keys, right, "x", None) is True
    assert len([r for r in caplog.records if "wrong access password from client 10.0.0.1" in r.getMessage()]) == 3


def test_ipv6_clients_count_per_64_and_mapped_ones_as_ipv4():
    """One host usually holds a whole /64: a fresh address per guess must not reset the count."""
    throttle = AttemptThrottle(max_failures=2, window_s=60, clock=lambda: 0.0)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2"):
        assert throttle.attempt(throttle_keys(host, host), lambda: False, "x", host) is False
    assert throttle.attempt(throttle_keys("s3", "2001:db8:1:2:ffff::9"), lambda: True, "x", None) == 60
    assert throttle.attempt(throttle_keys("s4", "2001:db8:1:3::1"), lambda: True, "x", None) is True  # another /64
    assert throttle_keys("s", "::ffff:192.0.2.7") == ["session:s", "client:192.0.2.7"]


def test_attempts_at_once_cannot_slip_past_the_limit_together():
    """Check, comparison and count are one lock section: of 20 wrong attempts sent at once with a limit of 3,
    exactly 3 are compared; the others are refused unread."""
    import threading

    throttle = AttemptThrottle(max_failures=3, window_s=60)
    compared, barrier = [], threading.Barrier(20)

    def slow_wrong_password() -> bool:
        compared.append(1)
        threading.Event().wait(0.01)  # a comparison that takes a while: the race window of a split check
        return False

    def attempt(index: int) -> None:
        barrier.wait()
        throttle.attempt(throttle_keys(f"s{index}", "10.0.0.9"), slow_wrong_password, "x", "10.0.0.9")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(compared) == 3


def test_password_comparison_does_not_depend_on_the_length():
    from glm_core.conversations.workspace import password_matches

    assert password_matches("hunter2", "hunter2") and not password_matches("hunter", "hunter2")
    assert not password_matches("", "hunter2") and not password_matches("hunter2" * 100, "hunter2")


def test_model_paths_outside_the_allowed_folders_are_refused_alike_whether_they_exist_or_not(tmp_path):
    models = tmp_path / "models"
    (models / "good").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (models / "escape").symlink_to(tmp_path / "secret")
    assert check_model_path("embedded", [models]) == "embedded"
    assert check_model_path(str(models / "good"), [models]) == str(models / "good")
    assert check_model_path("/anything", []) == "/anything"  # no GLM_MODEL_DIRS: any path, as before
    messages = set()
    for path in (tmp_path / "secret", tmp_path / "missing", models / "escape", models / ".." / "secret", "/etc"):
        with pytest.raises(PathNotAllowed) as refused:
            check_model_path(str(path), [models])
        messages.add(str(refused.value).replace(repr(str(path)), "PATH"))
    assert len(messages) == 1  # the same words for a folder that exists and one that does not


def test_large_benchmarks_and_server_folders_are_for_admins():
    check_benchmark("chatglm2-6b", 2048, 8192, admin=False, presets=PRESETS, loaded_path="/m")
    check_benchmark("/m", 2048, 8192, admin=False, presets=PRESETS, loaded_path="/m")  # the loaded model
    with pytest.raises(NotAllowed, match="for admins"):
        check_benchmark(
            "chatglm2-6b", 2048, USER_BENCH_MAX_GENERATE + 1, admin=False, presets=PRESETS, loaded_path=None
        )
    with pytest.raises(NotAllowed, match="folders on the server"):
        check_benchmark("/etc", 16, 16, admin=False, presets=PRESETS, loaded_path="/m")
    check_benchmark("/any/folder", 131072, 131072, admin=True, presets=PRESETS, loaded_path=None)


# ---- the pages ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_env(env_cleanup, tiny_model_dir):
    hub = get_hub()
    if hub.engine is not None and hub.engine.spec.path != str(tiny_model_dir):
        hub.unload()
    env_cleanup.setenv("GLM_MODEL_PATH", str(tiny_model_dir))
    env_cleanup.setenv("GLM_PRECISION", "fp32")
    get_throttle()._failures.clear()
    yield hub
    get_throttle()._failures.clear()
    hub.unload()


def texts(elements) -> str:
    return " ".join(e.value for e in elements)


def test_without_secrets_the_pages_offer_this_machines_browser_every_control(tiny_env):
    home = open_page(HOME)  # AppTest's session is this machine's (no client address), as a browser on localhost
    assert "You are an admin" in texts(home.sidebar.caption) and home.button(key="load_button")
    monitor = open_page(MONITOR)
    assert monitor.button(key="free_memory") and monitor.button(key="unload_model")


def test_non_admins_chat_but_cannot_load_unload_free_or_run_large_benchmarks(tiny_env):
    secrets = {"admin_password": "root pw"}
    home = open_page(HOME, secrets=secrets)
    assert "load_button" not in [b.key for b in home.button]
    assert "load_path" not in [t.key for t in home.text_input]
    assert "Only admins load another model or add servers." in texts(home.sidebar.caption)
    assert not any(b.key == "add_backend" for b in home.button)
    home.slider(key="max_new_tokens").set_value(4).run()
    home.chat_input[0].set_value("Hello").run()
    assert not home.exception and len(home.chat_message) == 2  # chatting works

    monitor = open_page(MONITOR, secrets=secrets)
    assert not [b for b in monitor.button if b.key in ("free_memory", "unload_model")]
    assert "for admins" in texts(monitor.caption)

    quant = open_page(QUANT, secrets=secrets)
    assert len(quant.radio(key="bench_choice").options) == 2  # no folder on the server
    assert quant.number_input(key="bench_generate").max == USER_BENCH_MAX_GENERATE


def test_the_admin_password_makes_a_session_admin_and_wrong_ones_are_throttled(tiny_env, caplog):
    secrets = {"admin_password": "root pw"}
    home = open_page(HOME, secrets=secrets)
    with caplog.at_level(logging.WARNING, logger="glm_core.access"):
        for _ in range(5):
            home.text_input(key="admin_password_input").set_value("guess")
            home.button(key="admin_submit").click().run()
            assert "Wrong password." in texts(home.error)
        home.text_input(key="admin_password_input").set_value("root pw")  # right, but too late
        home.button(key="admin_submit").click().run()
    assert "Too many wrong passwords" in texts(home.error) and "load_button" not in [b.key for b in home.button]
    assert sum("wrong admin password" in r.getMessage() for r in caplog.records) == 5

    get_throttle()._failures.clear()  # the window has passed
    home.text_input(key="admin_password_input").set_value("root pw")
    home.button(key="admin_submit").click().run()
    assert not home.exception and "load_button" in [b.key for b in home.button]
    assert "You are an admin" in texts(home.sidebar.caption)


def test_access_password_attempts_are_throttled(tiny_env):
    at = open_page(HOME, secrets={"access_password": "open sesame"})
    for _ in range(5):
        at.text_input(key="access_password_input").set_value("wrong")
        at.button(key="access_submit").click().run()
    at.text_input(key="access_password_input").set_value("open sesame")
    at.button(key="access_submit").click().run()
    assert "Too many wrong passwords" in texts(at.error) and not at.chat_input
    # Another session of the same client (here: the same machine) waits too.
    again = open_page(HOME, secrets={"access_password": "open sesame"})
    again.text_input(key="access_password_input").set_value("open sesame")
    again.button(key="access_submit").click().run()
    assert "Too many wrong passwords" in texts(again.error) and not again.chat_input


def test_listed_admins_are_admin_when_signed_in(tiny_env):
    secrets = {"admins": ["alice@example.com"]}
    assert "load_button" in [b.key for b in open_page(HOME, secrets=secrets, user=ALICE).button]
    assert "load_button" not in [b.key for b in open_page(HOME, secrets=secrets, user=BOB).button]


def test_an_admin_loads_only_inside_glm_model_dirs(tiny_env, env_cleanup, tmp_path, tiny_model_dir):
    env_cleanup.setenv("GLM_MODEL_DIRS", str(tmp_path / "models"))
    home = open_page(HOME)
    home.text_input(key="load_path").set_value(str(tiny_model_dir))
    home.button(key="load_button").click().run()
    assert "models load only from" in texts(home.error) and not home.exception
    env_cleanup.setenv("GLM_MODEL_DIRS", str(tiny_model_dir.parent))
    home.text_input(key="load_path").set_value(str(tiny_model_dir))
    home.button(key="load_button").click().run()
    assert not home.error and not home.exception


def test_the_automatic_default_load_never_replaces_a_model_loaded_meanwhile(tiny_model_dir):
    from glm_core import ModelSpec
    from glm_core.backends.hub import BackendHub

    hub = BackendHub()
    chosen = hub.load(ModelSpec(str(tiny_model_dir), "fp32", "cpu"))  # an admin's choice, just loaded
    try:
        # A session that saw no model a moment ago now asks for the default: it gets the admin's model.
        assert hub.load(ModelSpec("embedded"), if_none_loaded=True) is chosen and hub.engine is chosen
    finally:
        hub.unload()
