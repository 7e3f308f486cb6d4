"""nkat-server's command line: one-line errors with exit status 2, and the [server] config table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nkat_runtime.cli import common
from nkat_server import cli


def parse(argv, tmp_path):
    args = cli.build_parser().parse_args(argv)
    common.apply_config(args, {"server": cli.SERVER_KEYS, "model": common.MODEL_KEYS}, strict=("server",))
    return cli.resolve(args)


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./config.toml here
    a = parse([], tmp_path)
    assert (a.host, a.port, a.password, a.max_queue, a.max_body, a.default_max_tokens) == \
        ("127.0.0.1", 5001, None, 6, 32.0, 512)
    assert a.model is None and a.no_theta is False and a.no_cuda is False


@pytest.mark.parametrize("text,tokens", [("0", 0), ("4096", 4096), ("1MiB", 1024), ("0.5GiB", 512 * 1024),
                                         ("2mb", 2048)])
def test_kv_pool_in_tokens_or_bytes(tmp_path, text, tokens):
    from nkat_server.cli import pool_tokens

    assert pool_tokens(parse(["--kv-pool", text], tmp_path).kv_pool_size, 1024) == tokens


def test_server_table_fills_flags_and_flags_win(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nctx = 256\nmodel = "smollm2-135m"\n'
                   '[server]\nport = 6001\napi_key = "k1"\nmax_queue = 0\nmax_body = 2\ncontextsize = 128\n'
                   'no_theta = true\nhost = "0.0.0.0"\n')
    a = parse(["--config", str(cfg), "--port", "7002"], tmp_path)
    assert a.port == 7002 and a.password == "k1" and a.max_queue == 0 and a.max_body == 2
    assert a.ctx == 128 and a.model == "smollm2-135m" and a.no_theta is True and a.host == "0.0.0.0"


@pytest.mark.parametrize("argv,config,message", [
    (["--port", "abc"], None, "invalid int value"),
    (["--port", "70000"], None, "--port must be in 1..65535"),
    (["--max-queue", "-1"], None, "--max-queue must be >= 0"),
    (["--bogus"], None, "unrecognized arguments"),
    ([], '[server]\nprot = 5\n', "unknown key(s) in [server]: prot"),
    ([], '[server]\nport = "high"\n', "port must be of type int"),
    ([], '[server\n', "invalid TOML"),
    (["--model", "/no/such/model.gguf"], None, "model not found"),
    (["--kv-pool", "lots"], None, "--kv-pool must be a token count or a size"),
    (["--kv-pool", "-5"], None, "--kv-pool must be >= 0"),
    (["--kv-block-size", "0"], None, "--kv-block-size must be in 1..4096"),
    (["--decode-graphs", "maybe"], None, "invalid choice: 'maybe'"),
    ([], '[server]\ndecode_graphs = "always"\n', "--decode-graphs must be auto, on or off"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, argv, config, message):
    extra = []
    if config is not None:
        (tmp_path / "bad.toml").write_text(config)
        extra = ["--config", str(tmp_path / "bad.toml")]
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nkat-server: error: ") and message in err[0], err


def test_console_script_exit_code(tmp_path):
    res = subprocess.run([sys.executable, "-m", "nkat_server.cli", "--model", str(tmp_path / "missing.gguf")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("nkat-server: error: model not found")


def test_theta_state_in_the_startup_line():
    class FakeGGUF:
        def __init__(self, meta):
            self.meta = meta

        def get(self, key, default=None):
            return self.meta.get(key, default)

    class FakeLM:
        def __init__(self, meta):
            self.gguf = FakeGGUF(meta)

    args = cli.build_parser().parse_args([])
    args.no_theta, args.theta_gamma = False, None
    assert cli.theta_state(FakeLM({}), args) == "θ: none (plain GGUF)"
    nkat = FakeLM({"nkat.version": 1, "nkat.theta.gamma": 0.25})
    assert cli.theta_state(nkat, args) == "θ: on (γ=0.25)"
    args.theta_gamma = 0.5
    assert cli.theta_state(nkat, args) == "θ: on (γ=0.5)"
    args.no_theta = True
    assert cli.theta_state(nkat, args) == "θ: off (--no-theta)"
