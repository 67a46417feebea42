"""The Serve app (ray_ensembles.serving): Serve on a local Ray, spoken to over HTTP with the
standard library's client, and through a handle."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, shared_local_ray
from ports import free_port
from ray_ensembles import DeepEnsemble, DeepEnsembleClassifier
from ray_ensembles.model.inference import prediction_columns

FEATURES = ["crim", "rm", "age"]


def request(url: str, body=None, headers=None, method=None) -> tuple[int, dict]:
    """(status, JSON body) of one request; `body` is sent as given if bytes, else as JSON."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def expected(ensemble, X, coverage=0.9) -> list[dict]:
    columns = prediction_columns(ensemble, torch.as_tensor(np.asarray(X, dtype=np.float64)), coverage)
    return [{name: float(values[i]) for name, values in columns.items()} for i in range(len(X))]


def assert_rows_close(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        # float32 members: a batch's other rows change the rounding, and an interval's bound near
        # zero is a difference of large numbers, so the tolerance is relative to the row's scale
        scale = max(abs(v) for v in w.values())
        np.testing.assert_allclose([g[k] for k in w], list(w.values()), rtol=1e-6, atol=1e-6 * scale)


def saved_ensembles(root):
    """A regressor with feature names (and fitted, non-trivial input and target scales), a
    two-output regressor and a classifier; the last two in a folder, one as a sweep's trial."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 3, generator=g, dtype=torch.float64) * torch.tensor([5.0, 0.3, 20.0]) + 10
    reg = DeepEnsemble(3, 1, num_members=3, seed=1)
    reg.fit_normalization(X, X[:, :1] * 100 + 3)
    reg.feature_names = FEATURES
    two = DeepEnsemble(3, 2, num_members=2, seed=2)
    two.fit_normalization(X, X[:, :2])
    clf = DeepEnsembleClassifier(3, 4, num_members=3, seed=3)
    clf.fit_normalization(X)
    reg.save(root / "reg")
    two.save(root / "folder" / "two")
    clf.save(root / "folder" / "trial_7" / "ensemble")
    (root / "folder" / "notes.txt").write_text("not an ensemble")
    (root / "folder" / "empty").mkdir()
    return reg, two, clf


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from ray_ensembles.serving import ensemble_app

    root = tmp_path_factory.mktemp("serve")
    reg, two, clf = saved_ensembles(root)
    shared_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = dict(cpus_per_replica=0.5)
    serve.run(ensemble_app(root / "reg", max_batch_size=8, batch_wait_ms=200, max_body_bytes=4096, **small),
              name="reg", route_prefix="/reg")
    serve.run(ensemble_app(root / "reg", max_batch_size=1, **small), name="unbatched", route_prefix="/unbatched")
    serve.run(ensemble_app(root / "folder", max_ensembles_per_replica=1, **small), name="multi", route_prefix="/multi")
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "reg": reg, "two": two, "clf": clf}
    serve.shutdown()


def rows_of(X):
    return [dict(zip(FEATURES, map(float, x))) for x in X]


@pytest.mark.ray
def test_predictions_are_the_librarys_for_named_and_ordered_rows(served):
    X = np.array([[12.0, 9.7, -3.0], [1.5, 10.2, 40.0]])
    named = [{"age": x[2], "extra": "ignored", "crim": x[0], "rm": x[1]} for x in X.tolist()]  # any order
    status, body = request(served["url"] + "/reg/predict", {"rows": named, "coverage": 0.8})
    assert status == 200
    assert_rows_close(body["predictions"], expected(served["reg"], X, 0.8))
    assert "lower_0.8" in body["predictions"][0] and body["predictions"][0]["variance"] > 0
    status, ordered = request(served["url"] + "/reg/predict", {"rows": X.tolist()})
    assert status == 200
    assert_rows_close(ordered["predictions"], expected(served["reg"], X, 0.9))


@pytest.mark.ray
def test_the_handle_gives_the_same_predictions(served):
    from ray import serve

    X = [[3.0, 10.0, 5.0]]
    got = serve.get_app_handle("reg").predict.remote({"rows": X}).result()
    assert_rows_close(got["predictions"], expected(served["reg"], X))
    clf = serve.get_app_handle("multi").options(multiplexed_model_id="trial_7")
    probs = clf.predict.remote({"rows": X}).result()["predictions"][0]["probs"]
    np.testing.assert_allclose(probs, served["clf"].predict(torch.tensor(X, dtype=torch.float64)).probs[0], rtol=1e-6)


@pytest.mark.ray
def test_a_folder_of_ensembles_is_multiplexed_by_header_or_path(served):
    url, X = served["url"] + "/multi", [[1.0, 2.0, 3.0], [10.0, 10.0, 10.0]]
    status, listing = request(url + "/")
    assert status == 200 and listing["ensembles"] == ["trial_7", "two"]  # not the file or the empty folder
    status, two = request(url + "/ensembles/two/predict", {"rows": X})
    assert status == 200
    assert_rows_close(two["predictions"], expected(served["two"], X))
    assert "mean_1" in two["predictions"][0] and "lower_0.9_1" in two["predictions"][0]
    status, clf = request(url + "/predict", {"rows": X}, headers={"serve_multiplexed_model_id": "trial_7"})
    assert status == 200
    want = prediction_columns(served["clf"], torch.tensor(X, dtype=torch.float64))
    got = clf["predictions"]
    np.testing.assert_allclose([r["probs"] for r in got], np.stack([want[f"prob_{k}"] for k in range(4)], 1), rtol=1e-6)
    assert [r["predicted"] for r in got] == want["predicted"].tolist()
    np.testing.assert_allclose([r["mutual_information"] for r in got], want["mutual_information"], rtol=1e-5, atol=1e-9)
    # one ensemble per replica: asking for `two` again loads it again (the least recently used went)
    loads = request(url + "/")[1]["loads"]
    request(url + "/ensembles/two/predict", {"rows": X})
    assert request(url + "/")[1]["loads"]["two"] == loads["two"] + 1
    status, meta = request(url + "/ensembles/trial_7")
    assert status == 200 and meta["task"] == "classification" and meta["num_members"] == 3


@pytest.mark.ray
def test_concurrent_requests_share_forward_passes(served):
    X = np.random.default_rng(0).normal(10, 3, size=(16, 3))
    for app, largest in [("reg", 8), ("unbatched", 1)]:
        url = served["url"] + f"/{app}"
        before = request(url + "/")[1]
        with ThreadPoolExecutor(16) as pool:
            bodies = list(pool.map(lambda x: request(url + "/predict", {"rows": [x.tolist()]}), X))
        after = request(url + "/")[1]
        assert all(status == 200 for status, _ in bodies)
        got = [body["predictions"][0] for _, body in bodies]
        assert_rows_close(got, expected(served["reg"], X))  # each request got its own rows back
        passes = after["forward_passes"] - before["forward_passes"]
        if largest == 1:
            assert passes == 16 and after["largest_batch"] == 1
        else:
            assert passes < 16 and 1 < after["largest_batch"] <= largest


BAD_REQUESTS = [  # (what, path, body, headers, status, field)
    ("malformed JSON", "/reg/predict", b'{"rows": [[1, 2', {}, 400, "body"),
    ("not an object", "/reg/predict", [[1, 2, 3]], {}, 400, "body"),
    ("no rows", "/reg/predict", {"rows": []}, {}, 400, "rows"),
    ("a missing feature", "/reg/predict", {"rows": [{"crim": 1, "age": 2}]}, {}, 400, "rows[0].rm"),
    ("a non-number", "/reg/predict", {"rows": [[1, "two", 3]]}, {}, 400, "rows[0][1]"),
    ("a boolean", "/reg/predict", {"rows": [{"crim": 1, "rm": True, "age": 2}]}, {}, 400, "rows[0].rm"),
    ("NaN", "/reg/predict", b'{"rows": [[1, 2, 3], [NaN, 2, 3]]}', {}, 400, "rows[1][0]"),
    ("inf", "/reg/predict", b'{"rows": [[1, Infinity, 3]]}', {}, 400, "rows[0][1]"),
    ("beyond float64", "/reg/predict", b'{"rows": [[1, 2, 1e400]]}', {}, 400, "rows[0][2]"),
    ("a row too short", "/reg/predict", {"rows": [[1, 2]]}, {}, 400, "rows[0]"),
    ("a row neither", "/reg/predict", {"rows": [7]}, {}, 400, "rows[0]"),
    ("a row the ensemble cannot predict", "/reg/predict", {"rows": [[1, 2, 1e300]]}, {}, 422, "rows"),
    ("coverage 0", "/reg/predict", {"rows": [[1, 2, 3]], "coverage": 0}, {}, 400, "coverage"),
    ("coverage 1.5", "/reg/predict", {"rows": [[1, 2, 3]], "coverage": 1.5}, {}, 400, "coverage"),
    ("a body over the limit", "/reg/predict", {"rows": [[1, 2, 3]] * 1000}, {}, 413, "body"),
    ("an unknown ensemble", "/multi/ensembles/nine/predict", {"rows": [[1, 2, 3]]}, {}, 404, "ensemble"),
    ("a path as an id", "/multi/predict", {"rows": [[1, 2, 3]]}, {"serve_multiplexed_model_id": "../reg"}, 404, "ensemble"),
    ("no ensemble named", "/multi/predict", {"rows": [[1, 2, 3]]}, {}, 400, "serve_multiplexed_model_id"),
    ("an unknown route", "/reg/predicts", {"rows": [[1, 2, 3]]}, {}, 404, "path"),
    ("GET of predict", "/reg/predict", None, {}, 405, "method"),
    ("brackets nested 100k deep", "/unbatched/predict", b"[" * 100_000 + b"]" * 100_000, {}, 400, "body"),
]


@pytest.mark.ray
def test_bad_requests_get_a_4xx_naming_the_field_and_the_replica_keeps_serving(served):
    for what, path, body, headers, status, field in BAD_REQUESTS:
        got_status, got = request(served["url"] + path, body, headers)
        assert (got_status, got.get("field")) == (status, field), (what, got)
        assert got["error"] and "Traceback" not in got["error"], what
    assert request(served["url"] + "/reg/predict", {"rows": [[1, 2, 3]]})[1]["predictions"][0]["variance"] > 0
    _, far = request(served["url"] + "/reg/predict", {"rows": [[1, 2, 1e308]]})
    assert "row 0 is beyond float32 once standardised" in far["error"] and "target" not in far["error"], far
    _, nan = request(served["url"] + "/reg/predict", b'{"rows": [[NaN, 2, 3]]}')
    assert nan["value"] == "nan"
    status, health = request(served["url"] + "/reg/healthz")
    assert status == 200 and health == {"status": "ok"}
    status, meta = request(served["url"] + "/reg/")
    assert status == 200 and meta["feature_names"] == FEATURES and meta["num_members"] == 3


@pytest.mark.ray
def test_a_damaged_ensemble_in_a_folder_answers_503_naming_it_once_and_the_others_keep_serving(served):
    from ray import serve

    from ray_ensembles.serving import ensemble_app

    root = served["root"] / "mixed"
    shutil.copytree(served["root"] / "folder" / "two", root / "good one")  # a name with a space is served too
    shutil.copytree(served["root"] / "folder" / "two", root / "bad")
    member = next((root / "bad").glob("member_*.safetensors"))
    member.write_bytes(member.read_bytes()[:-100])  # truncated
    serve.run(ensemble_app(root, cpus_per_replica=0.5), name="mixed", route_prefix="/mixed")
    try:
        url = served["url"] + "/mixed"
        for _ in range(3):
            status, body = request(url + "/ensembles/bad/predict", {"rows": [[1, 2, 3]]})
            assert (status, body["field"], body["value"]) == (503, "ensemble", "bad"), body
            assert "'bad'" in body["error"] and "SHA-256" in body["error"], body
        listing = request(url + "/")[1]
        assert listing["loads"] == {"bad": 1}  # no reload on each request
        assert listing["ensembles"] == ["good one"] and "SHA-256" in listing["damaged"]["bad"]
        assert request(url + "/ensembles/good%20one/predict", {"rows": [[1, 2, 3]]})[0] == 200
    finally:
        serve.delete("mixed")


@pytest.mark.unit
def test_a_batch_whose_pass_fails_fails_only_the_request_at_fault():
    from ray_ensembles.serving import predict_parts

    ensemble = DeepEnsemble(3, 1, num_members=2, seed=0)
    good, bad = np.ones((2, 3)), np.full((1, 3), 1e300)  # finite, but beyond float32
    first, failed, last = predict_parts(ensemble, [good, bad, good[:1]])
    assert isinstance(failed, ValueError) and "row 0 is beyond float32 once standardised" in str(failed)
    alone = ensemble.predict(torch.from_numpy(good))
    torch.testing.assert_close(first.mean, alone.mean)
    torch.testing.assert_close(last.variance, alone.variance[:1])


@pytest.mark.unit
def test_ensemble_app_refuses_bad_input_before_deploying(tmp_path):
    from ray_ensembles.serving import app_builder, ensemble_app

    with pytest.raises(ValueError, match="'ensemble' parameter of ensemble_app.*holds no manifest.json"):
        ensemble_app(tmp_path)
    with pytest.raises(ValueError, match="'ensemble' parameter of ensemble_app.*no such folder"):
        ensemble_app(tmp_path / "missing")
    DeepEnsemble(3, 1, num_members=2).save(tmp_path / "ens")
    for option, value, error in [("max_batch_size", 0, ValueError), ("num_replicas", 1.5, TypeError),
                                 ("batch_wait_ms", -1.0, ValueError), ("max_body_bytes", 0, ValueError)]:
        with pytest.raises(error, match=option):
            ensemble_app(tmp_path / "ens", **{option: value})
    (tmp_path / "ens" / "member_001.safetensors").unlink()
    with pytest.raises(ValueError, match="member_001.safetensors is missing"):
        ensemble_app(tmp_path / "ens")
    with pytest.raises(ValueError, match="Unknown args \\['max_batch'\\]"):
        app_builder({"ensemble": str(tmp_path / "ens"), "max_batch": "8"})


@pytest.mark.unit
def test_the_serve_config_builds_the_app_with_its_options(tmp_path, monkeypatch):
    import importlib

    config = yaml.safe_load((REPO / "jobs" / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    app = config["applications"][0]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    DeepEnsemble(3, 1, num_members=2).save(tmp_path / app["args"]["ensemble"])
    monkeypatch.chdir(tmp_path)  # a relative path is the current directory's, as for the jobs
    built = builder({**app["args"], "max_batch_size": "4", "use_gpu": "false"})  # strings, as `serve run k=v` passes
    kwargs = built._bound_deployment.init_kwargs
    assert kwargs["max_batch_size"] == 4 and kwargs["use_gpu"] is False


def serve_job_error(capsys, argv) -> str:
    import serve as serve_job  # jobs/serve.py

    with pytest.raises(SystemExit) as exit_:
        serve_job.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["--ensemble", "/nonexistent/ens"], "'--ensemble' option"),
    (["--ensemble", "x", "--port", "0"], "'--port' option"),
    (["--ensemble", "x", "--route-prefix", "api"], "'--route-prefix' option"),
    (["--ensemble", "x", "--max-batch-size", "0"], "'--max-batch-size' option"),
    (["--ensemble", "x", "--replicas", "0"], "'--replicas' option"),
])
def test_the_serve_job_refuses_bad_options_in_one_line(capsys, argv, message, tmp_path):
    DeepEnsemble(3, 1, num_members=2).save(tmp_path / "x")
    argv = [str(tmp_path / a) if a == "x" else a for a in argv]
    err = serve_job_error(capsys, argv)
    assert message in err and "ensemble_app" not in err, err


@pytest.mark.unit
def test_the_serve_jobs_help_offers_only_what_serving_has(capsys):
    import serve as serve_job  # jobs/serve.py

    with pytest.raises(SystemExit):
        serve_job.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--verbose" in help_text and "--json" not in help_text and "--quiet" not in help_text


@pytest.mark.unit
def test_the_serve_job_refuses_a_port_in_use(capsys, tmp_path):
    DeepEnsemble(3, 1, num_members=2).save(tmp_path / "ens")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert f"127.0.0.1:{port}" in serve_job_error(capsys, ["--ensemble", str(tmp_path / "ens"), "--port", str(port)])


# Ray's HAProxy ingress (README, "Online predictions") is chosen by the environment of the Ray
# the job starts; its stats and metrics ports are moved off their fixed defaults
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


@pytest.mark.e2e
@pytest.mark.parametrize("ingress", ["proxy", "haproxy"])
def test_the_serve_job_answers_curl_on_loopback_only_and_stops_on_sigint(tmp_path, ingress):
    from ray._private.services import get_node_ip_address

    reg, _, _ = saved_ensembles(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    stats_port = free_port()
    if ingress == "haproxy":
        env.update(HAPROXY_ENV, RAY_SERVE_HAPROXY_STATS_PORT=str(stats_port),
                   RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()))
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "serve.py"), "--ensemble", str(tmp_path / "reg"),
                            "--port", str(port), "--cpus-per-replica", "0.5"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if request(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except (OSError, ValueError):  # not listening yet, or HAProxy's HTML 503 before the replica is up
                pass
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() is not None else "no answer"
            time.sleep(0.25)
        body = json.dumps({"rows": [{"crim": 1.5, "rm": 9.0, "age": 30.0}], "coverage": 0.9})
        done = subprocess.run([shutil.which("curl"), "-s", f"localhost:{port}/predict", "-d", body],
                              capture_output=True, text=True, timeout=60, check=True)
        assert_rows_close(json.loads(done.stdout)["predictions"], expected(reg, [[1.5, 9.0, 30.0]]))
        if ingress == "haproxy":  # HAProxy really runs: its stats port answers
            socket.create_connection(("127.0.0.1", stats_port), timeout=5).close()
        outside = get_node_ip_address()  # this machine's address on its network
        assert not outside.startswith("127.")
        with pytest.raises(OSError):  # refused: the proxy listens on 127.0.0.1 only
            socket.create_connection((outside, port), timeout=5).close()
    finally:
        job.send_signal(signal.SIGINT)
        out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out
    assert "Serving" in out and f"http://127.0.0.1:{port}/predict" in out
    with pytest.raises(OSError):
        request(f"http://127.0.0.1:{port}/healthz")
