"""Secure two-party inference under SPU: agreement with plaintext, per-class counts, two processes.

Tiny shapes only (2 layers, d=32, T=8): each secure run takes a few seconds on 2 cores.
"""

import json

import numpy as np
import pytest

pytest.importorskip("spu", reason="secure inference needs the `pi` extra")
torch = pytest.importorskip("torch")

from piformer.checkpoint import save_checkpoint  # noqa: E402
from piformer.config import ModelConfig  # noqa: E402
from piformer.model import PiGPT  # noqa: E402
from piformer.pi.jax_forward import state_dict_to_numpy  # noqa: E402
from piformer.pi.secure import SecureReport, latency_model, run_secure  # noqa: E402
from piformer.pi.spu_backend import SPUSettings, local_share, mem_link_desc, parse_log, require_spu  # noqa: E402

pytestmark = pytest.mark.spu

T = 8


def _model(preset: str, seed: int = 0) -> PiGPT:
    torch.manual_seed(seed)
    m = PiGPT(ModelConfig.from_preset(preset, size="tiny")).eval()
    with torch.no_grad():  # weights of std 0.1: attention far from uniform, logits of order 1
        for name, p in m.named_parameters():
            if "temperature" in name:
                continue  # set below, in t whatever its parametrisation
            if p.dim() >= 2:
                p.mul_(5.0)
            elif "ffn_beta" in name:
                p.fill_(0.8)
        for b in m.transformer.h:
            if b.attn.temperature is not None:
                b.attn.set_temperature(0.5 + torch.rand(b.attn.temperature.shape))
    return m


_IDS = np.array([3, 14, 15, 92, 65, 35, 89, 79])


@pytest.fixture(scope="module")
def baseline_report() -> SecureReport:
    m = _model("SM+LN+G")
    return run_secure(state_dict_to_numpy(m), m.config, _IDS[:T], SPUSettings(), vocab_chunk=64)


def test_secure_agrees_with_plaintext(baseline_report):
    r = baseline_report
    a = r.accuracy
    # FM64 with 18 fraction bits; GELU's tanh and the softmax's exp/reciprocal are approximations.
    assert a["argmax_agreement"] == 1.0, a
    assert a["next_token_match"]
    assert a["max_abs_logit_error"] < 0.05, a
    assert r.logits.shape == (T, 97)


def test_every_operator_class_communicates(baseline_report):
    r = baseline_report
    assert set(r.per_class) == {"embedding", "layernorm", "matmul", "softmax", "activation", "head"}
    for name, c in r.per_class.items():
        assert c.bytes > 0 and c.messages > 0, name
    assert r.total_bytes == sum(s["bytes"] for s in r.steps)
    assert r.setup["bytes"] > 0  # one-time setup is counted apart
    assert r.reveal_bytes > 0
    # the two blocks cost about the same: the setup pass absorbed the one-time setup (tens of
    # MB here); what remains is an OT-buffer refill (~1 MB) inside whichever step empties it
    block = [sum(s["bytes"] for s in r.steps if s["name"].startswith(f"h{i}.")) for i in (0, 1)]
    assert abs(block[0] - block[1]) < 0.1 * min(block) < r.setup["bytes"]
    wan = r.latency("WAN")
    assert wan["total_s"] == pytest.approx(wan["compute_s"] + wan["transfer_s"] + wan["waiting_s"])
    assert json.dumps(r.to_dict())  # serialisable for --json


def test_softmax_only_communicates_less(baseline_report):
    m = _model("EReg(SM(t)+ScFuFFN)")
    r = run_secure(state_dict_to_numpy(m), m.config, _IDS[:T], SPUSettings(), vocab_chunk=64)
    assert r.total_bytes < baseline_report.total_bytes
    assert "activation" not in r.per_class
    assert r.per_class["other"].bytes > 0  # temperature and beta scalings
    # Temperatures of 1e-2 make a random model's logits near-ties, so argmax may flip on a
    # fixed-point error of 1e-4 (seen: 7 of 8 positions); hold the logits themselves instead.
    assert r.accuracy["max_abs_logit_error"] < 1e-2, r.accuracy


def test_private_inputs_are_not_shared():
    """The non-owner's share of a private input is a data-independent placeholder."""
    spu = require_spu()
    io = spu.Io(2, SPUSettings().runtime_config(profile=False))
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    real = io.make_shares(w, spu.libspu.Visibility.VIS_SECRET, 1)[0]
    placeholder = local_share(io, None, 0, 1, w.shape, np.float32)
    assert bytes(real.meta) == bytes(placeholder.meta)
    assert [bytes(c) for c in real.share_chunks] == [bytes(c) for c in placeholder.share_chunks]


def test_log_parser_and_latency_model():
    text = (
        "x [Profiling] SPU execution h0.softmax completed, input processing took 1e-06s, execution took 0.5s, "
        "output processing took 1e-06s, total time 0.5s.\n"
        "x - pphlo.exponential, executed 1 times, duration 0.2s, send bytes 10 recv bytes 20, send actions 1, recv actions 2\n"
        "x Link details: total send bytes 100, recv bytes 200, send actions 3, recv actions 4\n"
    )
    (run,) = parse_log(text)
    assert (run.name, run.bytes, run.messages, run.exec_s) == ("h0.softmax", 300, 7, 0.5)
    assert run.ops["pphlo.exponential"]["bytes"] == 30
    lat = latency_model(2.0, 100_000_000, 10, 100e6, 0.08)
    assert lat["transfer_s"] == pytest.approx(8.0) and lat["waiting_s"] == pytest.approx(0.4)


def test_settings_presets():
    s = SPUSettings.preset("optimised")
    # mul_lsb_error is what returned wrong batches (docs/private_inference.md, 'Wrong values')
    assert s.denominator_broadcast and s.ot_kind == "EMP_Ferret" and not s.mul_lsb_error
    assert not s.runtime_config().cheetah_2pc_config.enable_mul_lsb_error
    unsafe = SPUSettings.preset("optimised-lsb-error")
    assert unsafe.mul_lsb_error and unsafe.runtime_config().cheetah_2pc_config.enable_mul_lsb_error
    with pytest.raises(ValueError, match="unknown SPU settings"):
        SPUSettings.preset("fast")


def test_the_formerly_failing_exponential_is_right_every_time_with_the_optimised_settings():
    """The wrong values, narrowed: with mul_lsb_error on, SPU 0.9.5's exponential at a GPT-2 head's
    scores shape (12 x 128 x 128, 8 squarings) returned a whole 8,192-value HE batch of garbage in
    about one run in ten (results/pi/op_stress.json). The optimised settings no longer set it: the
    same case, several times in one session, every output checked."""
    import jax.numpy as jnp

    from piformer.pi.harness import run_op_repeatedly

    rng = np.random.default_rng(0)
    pairs = [(rng.normal(0, 1, (12, 128, 128)).astype(np.float32), rng.normal(0, 1, (12, 128, 128)).astype(np.float32))
             for _ in range(4)]
    outs = run_op_repeatedly(lambda x, y: jnp.exp(x + y - 4.0), pairs, SPUSettings.preset("optimised"), "exp")
    for (x, y), (got, _) in zip(pairs, outs):
        want = np.exp(x.astype(np.float64) + y - 4.0)
        assert np.abs(got - want).max() < 1.0  # fixed-point error here is ~0.1; a failed batch is off by 1e2-1e8


def test_a_setting_known_to_return_wrong_values_is_named_in_the_report(baseline_report):
    from dataclasses import replace

    from piformer.pi.secure import format_report

    r = baseline_report
    assert "WARNING" not in format_report(r)
    r2 = replace(r, settings=SPUSettings.preset("optimised-lsb-error").to_dict())
    text = format_report(r2, color=True)
    assert "WARNING: mul_lsb_error=True" in text and "\033[1;31m" in text


def test_cli_threads_and_two_processes(tmp_path, capsys):
    """`pi-run` on a checkpoint: one process, then two OS processes over loopback TCP."""
    from piformer.cli import main

    ckpt = save_checkpoint(tmp_path / "ckpt", _model("SM+ScFuFFN"))
    assert main(["pi-run", str(ckpt), "--seq-len", "6", "--vocab-chunk", "50", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["mode"] == "threads" and one["accuracy"]["argmax_agreement"] == 1.0

    assert main(["pi-run", str(ckpt), "--seq-len", "6", "--vocab-chunk", "50", "--two-process", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["mode"] == "processes"
    assert two["accuracy"]["argmax_agreement"] == 1.0
    assert two["reveal_bytes"] > 0 and two["total_bytes"] > 0
    # the same program over TCP moves about the same bytes as over the in-memory link
    assert two["total_bytes"] == pytest.approx(one["total_bytes"], rel=0.05)
    for name in ("embedding", "matmul", "softmax", "head"):
        assert two["per_class"][name]["bytes"] > 0


def test_cli_errors(tmp_path, capsys):
    from piformer.cli import main

    assert main(["pi-run", str(tmp_path / "nope"), "--seq-len", "4"]) == 2
    ckpt = save_checkpoint(tmp_path / "ckpt", _model("SM"))
    assert main(["pi-run", str(ckpt), "--seq-len", "999"]) == 2
    assert "block_size" in capsys.readouterr().err


@pytest.mark.slow
def test_measured_waits_over_a_delayed_link(tmp_path):
    """Two processes over TCP with 20 ms one-way delay: the protocol's waits are measured, and
    fewer than SPU's message count (its messages overlap)."""
    from piformer.pi.secure import measure_rounds

    ckpt = save_checkpoint(tmp_path / "ckpt", _model("SM+ScFuFFN"))
    r = measure_rounds(str(ckpt), _IDS[:6], SPUSettings(), delay_s=0.02, vocab_chunk=50)
    assert r["wall_delayed_s"] > r["wall_s"]
    assert 20 < r["one_way_waits"] < r["messages"]
    assert r["per_class_one_way_waits"]["softmax"] > r["per_class_one_way_waits"]["matmul"]


def test_each_in_memory_session_gets_its_own_link():
    """Sessions in one process must not share channels: a message one left unread would reach the next."""
    ids = {mem_link_desc().id for _ in range(3)}
    assert len(ids) == 3 and all(ids)


def test_pi_query_with_no_server_fails_at_its_timeout(capsys):
    """No server at the address: exit 69 with the address in one line, at the timeout, not minutes later."""
    import time

    from piformer.cli import main
    from piformer.pi.secure import _free_ports

    server, client = _free_ports(2)
    t0 = time.monotonic()
    rc = main(["pi-query", "--server", f"127.0.0.1:{server}", "--listen", f"127.0.0.1:{client}",
               "--connect-timeout", "1.5", "--tokens", "1,2,3"])
    waited = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 69
    assert f"127.0.0.1:{server}" in err and "did not answer within 1.5 s" in err
    assert len(err.strip().splitlines()) == 1
    assert 1.5 <= waited < 10


def test_a_token_id_outside_the_vocabulary_ends_both_parties(tmp_path, capsys):
    """The client refuses the ids after learning the server's vocabulary: it tells the server to
    close first, so the client exits 2 and the server process ends on its own (neither hangs)."""
    import subprocess
    import sys

    from piformer.cli import main
    from piformer.pi.secure import _free_ports

    ckpt = save_checkpoint(tmp_path / "ckpt", _model("SM"))
    server, client = _free_ports(2)
    proc = subprocess.Popen([sys.executable, "-m", "piformer.pi.serve", str(ckpt), "--listen", f"127.0.0.1:{server}",
                             "--client", f"127.0.0.1:{client}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        rc = main(["pi-query", "--server", f"127.0.0.1:{server}", "--listen", f"127.0.0.1:{client}",
                   "--tokens", "1,2,999999"])
        assert rc == 2
        assert "token ids must be in [0, " in capsys.readouterr().err
        assert proc.wait(timeout=60) == 0  # the server saw the close and exited by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("preset_name", ["default", "optimised"])
def test_setup_plus_per_inference_equals_the_whole_program_run_as_one(preset_name):
    """The per-step accounting against a harness that shares none of it: the whole forward pass
    compiled as one executable on a fresh link. Its bytes are the one-time setup plus one
    inference; pi-run's setup and per-inference figures must add up to them (within 2%), and
    steps of the same shape cost the same (the setup pass absorbed every one-time cost)."""
    from piformer.pi.harness import run_as_one_program

    m = _model("SM+ScFuFFN")
    sd, settings = state_dict_to_numpy(m), SPUSettings.preset(preset_name)
    one = run_as_one_program(sd, m.config, _IDS[:T], settings, vocab_chunk=40)
    r = run_secure(sd, m.config, _IDS[:T], settings, vocab_chunk=40)
    assert r.setup["bytes"] > 0 and r.setup["pass_bytes"] > r.setup["bytes"]
    assert r.total_bytes + r.setup["bytes"] == pytest.approx(one["bytes"], rel=0.02)
    assert np.abs(one["logits"] - r.logits).max() < 0.05
    per_step = {s["name"]: s for s in r.steps}
    assert [n for n in per_step if n.startswith("head.")] == ["head.0", "head.1", "head.2"]  # 97 = 40 + 40 + 17
    first, second = per_step["head.0"], per_step["head.1"]
    assert abs(first["bytes"] - second["bytes"]) < 0.01 * second["bytes"]
    assert first["messages"] <= second["messages"] + 2


def test_a_result_beyond_the_tolerance_is_reported_wrong(tmp_path, capsys):
    """pi-run never reports disagreeing secure logits quietly: the text says WRONG RESULT, the JSON
    says within_tolerance false, and the exit status is 4 (here with a tolerance no fixed-point
    result can meet)."""
    from piformer.cli import main

    ckpt = save_checkpoint(tmp_path / "ckpt", _model("SM+ScFuFFN"))
    assert main(["pi-run", str(ckpt), "--seq-len", "4", "--vocab-chunk", "50", "--tolerance", "1e-9"]) == 4
    out, err = capsys.readouterr()
    assert "WRONG RESULT" in out and "tolerance of 1e-09" in out
    assert "WRONG RESULT" in err and "\033[" not in out  # no colour codes when not on a terminal
    assert main(["pi-run", str(ckpt), "--seq-len", "4", "--vocab-chunk", "50", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc["within_tolerance"] is True and acc["tolerance"] == 0.5


def test_nothing_leaks_around_spu(tmp_path, capsys, monkeypatch):
    """pi-serve / pi-query as two processes: the server's output and SPU log never show the
    client's token ids, and the client's output and SPU log never show the server's weights."""
    import subprocess
    import sys

    from piformer.cli import main
    from piformer.pi.secure import _free_ports

    model = _model("SM+ScFuFFN")
    with torch.no_grad():  # distinctive weights, easy to search for in text
        w = model.transformer.h[0].attn.q_proj.weight
        w[0, :4] = torch.tensor([0.7319461, -0.4283927, 0.5147253, -0.6692814])
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    secrets_w = ["0.731946", "0.428392", "0.514725", "0.669281"]
    ids = [71, 13, 42, 88, 57, 19]
    server, client = _free_ports(2)
    server_log = tmp_path / "server-spu.log"
    proc = subprocess.Popen([sys.executable, "-m", "piformer.pi.serve", str(ckpt), "--listen", f"127.0.0.1:{server}",
                             "--client", f"127.0.0.1:{client}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**__import__("os").environ, "PIFORMER_SPU_LOG": str(server_log)})
    try:
        assert main(["pi-query", "--server", f"127.0.0.1:{server}", "--listen", f"127.0.0.1:{client}",
                     "--tokens", ",".join(map(str, ids)), "--vocab-chunk", "50", "--json"]) == 0
        server_out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    client_out = "".join(capsys.readouterr())
    from piformer.pi.spu_backend import SPULog

    client_spu = SPULog.path().read_text(errors="replace")
    server_text = server_out + server_log.read_text(errors="replace")
    for form in (",".join(map(str, ids)), " ".join(map(str, ids)), ", ".join(map(str, ids))):
        assert form not in server_text
    for value in secrets_w:
        assert value not in client_out and value not in client_spu
    assert "query of 6 tokens" in server_out  # the server learns the length, which is public


def test_a_secure_run_reports_progress_part_by_part():
    m = _model("SM+ScFuFFN")
    seen = []
    run_secure(state_dict_to_numpy(m), m.config, _IDS[:4], SPUSettings(), vocab_chunk=40,
               progress=lambda phase, done, total, part, elapsed: seen.append((phase, part, done, total)))
    setup = [(part, done, total) for phase, part, done, total in seen if phase == "setup pass"]
    measured = [(part, done, total) for phase, part, done, total in seen if phase == "secure forward"]
    assert [p for p, _, _ in measured] == ["embedding", "block 0", "block 1", "final LayerNorm", "head"]
    assert [p for p, _, _ in setup] == ["embedding", "block 0", "final LayerNorm", "head"]
    assert measured[-1][1] == measured[-1][2]  # the last part ends the pass
    assert all(a[1] < b[1] for a, b in zip(measured, measured[1:]))


def test_ctrl_c_stops_a_secure_run_with_a_message(tmp_path):
    """SIGINT during a long secure pass: exit status 130 at once, one line saying what stopped,
    no traceback (the SPU party threads must not keep the process alive)."""
    import signal
    import subprocess
    import sys
    import time

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("SM+LN+G", size="tiny", n_layer=6, n_embd=64, n_head=4, block_size=32)
    ckpt = save_checkpoint(tmp_path / "ckpt", PiGPT(cfg))
    # A shell's background job (nohup ... &) starts with SIGINT ignored, and Python then installs no
    # Ctrl-C handler; restore the default so the child behaves as under a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "piformer.cli", "pi-run", str(ckpt), "--seq-len", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stderr.readline()  # the first progress line: the secure pass is under way
        assert "done (step" in first, first
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert time.monotonic() - t0 < 30
    assert "interrupted: secure run stopped" in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "WRONG" not in out and "per class" not in out  # no report of a run that did not finish


def test_logits_beyond_the_exponentials_range_are_named_and_clipping_fixes_them():
    """A collapsed softmax (the trained softmax-only GPT-2 reached row spans of 1.5e4) feeds SPU's
    exponential inputs far below -500, where it is garbage: the report names the span and says
    to clip; with --exp-clip 20 the same model is right."""
    m = _model("SM(t)+ScFuFFN")
    with torch.no_grad():  # small learnt temperatures divide the logits: a collapsed softmax
        for b in m.transformer.h:
            b.attn.set_temperature(torch.full(b.attn.temperature.shape, 1e-5))
    sd = state_dict_to_numpy(m)
    plain = run_secure(sd, m.config, _IDS, SPUSettings())
    assert plain.accuracy["softmax_input_span"] > 1000
    assert plain.accuracy["exp_out_of_range"]
    assert not plain.accuracy["within_tolerance"]  # measured: max error 0.86, argmax agreement 62.5%
    clipped = run_secure(sd, m.config, _IDS, SPUSettings(exp_clip=20.0))
    assert not clipped.accuracy["exp_out_of_range"]
    assert clipped.accuracy["within_tolerance"], clipped.accuracy
    assert clipped.accuracy["max_abs_logit_error"] < plain.accuracy["max_abs_logit_error"]


def test_each_argmax_disagreement_carries_plaintexts_top2_gap():
    """A flipped prediction where plaintext's two best logits are nearly tied is fixed-point
    imprecision, not a wrong value: the accuracy names every disagreement with that gap."""
    from piformer.pi.secure import _accuracy

    plain = np.array([[1.0, 0.9997, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    secure = plain + np.array([[-0.002, 0.002, 0.0], [0.0, 0.0, 0.0], [-2.5, 0.0, 0.0]])
    a = _accuracy(secure, plain, SPUSettings())
    assert [d["position"] for d in a["argmax_disagreements"]] == [0, 2]
    assert a["argmax_disagreements"][0]["plaintext_top2_gap"] == pytest.approx(0.0003)
    assert a["argmax_disagreements"][1]["plaintext_top2_gap"] == pytest.approx(2.0)
    assert a["argmax_agreement"] == pytest.approx(1 / 3)


def test_the_packed_causal_softmax_costs_less_and_gives_the_same_logits():
    """--causal-pack exponentiates only the visible half of each attention matrix: the softmax
    communicates less and the secure logits still agree with plaintext. Squarings cost by HE
    batches of 8,192 values, so the saving needs attention matrices of several batches: 4 heads
    x 96 x 96 is 5 batches, packed 3."""
    torch.manual_seed(0)
    m = PiGPT(ModelConfig.from_preset("SM+ScFuFFN", size="tiny", n_layer=1, n_head=4, block_size=96)).eval()
    sd, ids = state_dict_to_numpy(m), np.resize(_IDS, 96)

    def softmax_bytes(pack: bool):
        r = run_secure(sd, m.config, ids, SPUSettings.preset("optimised", causal_pack=pack), vocab_chunk=64)
        assert r.accuracy["argmax_agreement"] == 1.0 and r.accuracy["within_tolerance"], r.accuracy
        return sum(s["bytes"] for s in r.steps if s["class"] == "softmax"), r.logits

    full, full_logits = softmax_bytes(False)
    packed, packed_logits = softmax_bytes(True)
    assert packed < 0.95 * full, (packed, full)
    np.testing.assert_allclose(packed_logits, full_logits, atol=0.05)


def test_a_layernorm_beyond_spus_rsqrt_range_is_named_and_ln_wide_fixes_it():
    """SPU's rsqrt returns 0 from 2^17 on, so a LayerNorm over rows of larger variance (the
    final LayerNorm of the softmax-only GPT-2, std ~1e4) outputs garbage: the report names the
    variance and says to widen; with ln_wide the same model is right."""
    m = _model("SM+LN+G")
    with torch.no_grad():
        m.transformer.wpe.weight.normal_(0.0, 1000.0)  # ln_f's rows: variance ~1e6
        m.transformer.wte.weight.normal_(0.0, 1.0)  # tied head: logits of order 5
    sd = state_dict_to_numpy(m)
    plain = run_secure(sd, m.config, _IDS, SPUSettings(), vocab_chunk=64, layers=0)
    assert plain.accuracy["layernorm_input_variance"] > 2 ** 17
    assert plain.accuracy["layernorm_out_of_range"]
    assert not plain.accuracy["within_tolerance"], plain.accuracy
    wide = run_secure(sd, m.config, _IDS, SPUSettings(ln_wide=True), vocab_chunk=64, layers=0)
    assert not wide.accuracy["layernorm_out_of_range"]
    assert wide.accuracy["within_tolerance"] and wide.accuracy["argmax_agreement"] == 1.0, wide.accuracy


def test_several_prompts_in_one_session_match_one_session_each(baseline_report):
    # One compile and one setup pass for three prompts: each prompt's logits are those a session
    # of its own computes (the first is baseline_report's prompt), and every one is checked.
    from piformer.pi.secure import run_secure_prompts

    m = _model("SM+LN+G")
    prompts = np.stack([_IDS, _IDS[::-1], (_IDS * 7) % 97])
    seen = []
    results = run_secure_prompts(state_dict_to_numpy(m), m.config, prompts, SPUSettings(), vocab_chunk=64,
                                 on_prompt=lambda r: seen.append(r.index))
    assert seen == [0, 1, 2] and [r.index for r in results] == [0, 1, 2]
    for r in results:
        assert r.accuracy["argmax_agreement"] == 1.0, r.accuracy
        assert r.accuracy["max_abs_logit_error"] < 0.05, r.accuracy
        assert r.seconds > 0
    # the same prompt in its own session: same fixed-point result up to the shares' randomness
    assert abs(results[0].accuracy["max_abs_logit_error"] - baseline_report.accuracy["max_abs_logit_error"]) < 0.02


def test_cli_prompts_checks_validation_windows_in_one_session(tmp_path, capsys):
    """`pi-run --prompts N`: N different windows of the run's validation split, each checked."""
    from tiny_runs import prepared_data, tiny_run

    from piformer.checkpoint import load_model
    from piformer.cli import main
    from piformer.pi.tokens import validation_windows

    run = tiny_run(tmp_path, prepared_data(tmp_path), "SM+ScFuFFN")
    cfg = load_model(run).config
    windows, source = validation_windows(run, 6, 3, cfg.vocab_size, cfg.block_size)
    assert windows.shape == (3, 6) and len({tuple(w) for w in windows}) == 3 and "validation" in source

    assert main(["pi-run", str(run), "--prompts", "3", "--seq-len", "6", "--vocab-chunk", "150", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["prompts"] == 3 and out["predictions"] == 18
    assert out["argmax_agreement"] == 1.0 and out["max_abs_logit_error"] < 0.05, out
    assert [p["prompt"] for p in out["per_prompt"]] == [0, 1, 2]
    assert "prompt 3/3" in captured.err  # one progress line per prompt

    # a tolerance no fixed-point run can meet: every prompt is reported wrong, exit status 4
    assert main(["pi-run", str(run), "--prompts", "1", "--seq-len", "6", "--vocab-chunk", "150",
                 "--tolerance", "1e-9"]) == 4
    assert "WRONG RESULT" in capsys.readouterr().err

    for bad, what in ((["--prompts", "2"], "--seq-len"), (["--prompts", "2", "--seq-len", "4", "--tokens", "1,2"], "--tokens"),
                      (["--prompts", "100000", "--seq-len", "6"], "fewer than")):
        assert main(["pi-run", str(run), *bad]) == 2
        assert what in capsys.readouterr().err
