"""The report of ``python -m benchmarks.run``: one markdown table and the targets' verdicts.

Headline ratios are against OpenSSH at its fastest cipher on the machine (issue 17): the
``_fastest`` paths of :mod:`benchmarks.suite_compare`; the default-cipher and aes128-gcm
paths are shown next to them.
"""

from __future__ import annotations

from typing import Any, Dict, List

from benchmarks.suite_compare import FLOOR_STYLES, VARIANTS

MIB = 1024 * 1024
MB = 1000 * 1000

# Targets of issues 6 and 17 (medians, same machine, same run).
TARGET_RATIO_REVERSE = 2.0      # ours / OpenSSH reverse path at its fastest cipher
TARGET_RATIO_SSH_L = 1.0        # ours / ssh -L at its fastest cipher
TARGET_WARM_P50_MS = 10.0
TARGET_COLD_VS_SSH = 1.0
TARGET_RTT_VS_REVERSE = 1.0     # added RTT p50, ours / OpenSSH reverse path
TARGET_AGENT_CPU_VS_SSHD = 0.5  # agent CPU s/GiB / sshd's (ssh -L, fastest cipher)
TARGET_AGENT_IDLE_MIB = 40 * MB / MIB
TARGET_PER_SESSION_KIB = 256.0
TARGET_RELAY_MIB = 1024.0


def _verdict(ok: bool, miss: str) -> str:
    return "met" if ok else "MISSED: %s" % miss


def _floor_note(r: Dict[str, Any], direction: str, sshd: float) -> str:
    """What a bare forwarder pays for the agent's work in ``direction`` (section 7):
    up the agent opens frames, down it seals them."""
    floor = r.get("cpu_floor_s_per_gib")
    if not floor:
        return ""
    verb = "open" if direction == "up" else "seal"
    return ("; a bare forwarder pays %s (copy only %.2f = %.2fx sshd)" % (
        ", ".join("%.2f with %s %s (%.2fx)" % (floor["%s-%s" % (verb, lib)], verb, lib,
                                                floor["%s-%s" % (verb, lib)] / sshd)
                  for lib in ("libsodium", "openssl")),
        floor["copy"], floor["copy"] / sshd))


def _rtt_floor_note(lat: Dict[str, Any], ref: float) -> str:
    """What the same chain adds with the least work per message (section 4's floor)."""
    floors = [(style, lat["floor_chain_" + style]["added_p50"]) for style in FLOOR_STYLES
              if "floor_chain_" + style in lat]
    if not floors:
        return ""
    return "; the same chain with bare hops adds %s" % ", ".join(
        "%.3f ms with %s hops (%.2fx)" % (a, style, a / ref) for style, a in floors)


def targets(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each issue-6/17 target next to its figure: met, or missed by how much."""
    rows: List[Dict[str, Any]] = []

    def add(name: str, value: float, target: str, ok: bool, miss: str) -> None:
        rows.append({"target": name, "value": value, "goal": target,
                     "verdict": _verdict(ok, miss)})

    tp = r.get("throughput")
    if tp:
        for d in ("up", "down"):
            ratios = tp[d]["ratio_tunnel_vs"]
            one = ratios["ssh_L_fastest"]
            add("throughput %s ours/ssh -L (fastest cipher)" % d, one,
                ">= %.1fx" % TARGET_RATIO_SSH_L, one >= TARGET_RATIO_SSH_L,
                "%.0f%% short" % (100 * (1 - one / TARGET_RATIO_SSH_L)))
            rev = ratios["ssh_reverse_fastest"]
            add("throughput %s ours/OpenSSH reverse (fastest cipher)" % d, rev,
                ">= %.1fx" % TARGET_RATIO_REVERSE, rev >= TARGET_RATIO_REVERSE,
                "%.0f%% short" % (100 * (1 - rev / TARGET_RATIO_REVERSE)))
            cpu = tp[d].get("cpu_s_per_gib", {})
            agent = cpu.get("tunnel", {}).get("agent")
            sshd = cpu.get("ssh_L_fastest", {}).get("sshd")
            if agent is not None and sshd:
                ratio = agent / sshd
                add("agent CPU/GiB / sshd's (ssh -L fastest), %s" % d, ratio,
                    "<= %.1fx" % TARGET_AGENT_CPU_VS_SSHD, ratio <= TARGET_AGENT_CPU_VS_SSHD,
                    "%.2f s/GiB against sshd's %.2f%s" % (agent, sshd,
                                                         _floor_note(r, d, sshd)))
    setup = r.get("session_setup_ms", {})
    if "warm" in setup:
        w = setup["warm"]["first_byte_p50"]
        add("warm session set-up p50 (ms)", w, "<= %.0f ms" % TARGET_WARM_P50_MS,
            w <= TARGET_WARM_P50_MS, "%.1f ms over (%.1fx)" % (w - TARGET_WARM_P50_MS,
                                                            w / TARGET_WARM_P50_MS))
    if "cold" in setup:
        c = setup["cold"]
        ratio = c["stdio_first_byte_p50"] / c["ssh_true_p50"]
        add("cold stdio (own session) p50 / fresh ssh p50", ratio,
            "<= %.1fx" % TARGET_COLD_VS_SSH, ratio <= TARGET_COLD_VS_SSH,
            "%.0f ms over ssh's %.0f ms" % (c["stdio_first_byte_p50"] - c["ssh_true_p50"],
                                            c["ssh_true_p50"]))
        if "stdio_via_master_p50" in c:
            ratio = c["stdio_via_master_p50"] / c["ssh_true_p50"]
            add("cold stdio via a running master p50 / fresh ssh p50", ratio,
                "<= %.1fx" % TARGET_COLD_VS_SSH, ratio <= TARGET_COLD_VS_SSH,
                "%.0f ms over ssh's %.0f ms" % (c["stdio_via_master_p50"] - c["ssh_true_p50"],
                                                c["ssh_true_p50"]))
    lat = r.get("latency_ms")
    if lat:
        ref = lat["ssh_reverse_fastest"]["added_p50"]
        for name, label in (("tunnel", "forward"), ("stdio", "stdio"),
                            ("stdio_via_master", "stdio via master")):
            if name not in lat:
                continue
            a = lat[name]["added_p50"]
            add("added RTT p50 %s / OpenSSH reverse (fastest)" % label, a / ref,
                "<= %.1fx" % TARGET_RTT_VS_REVERSE, a <= ref * TARGET_RTT_VS_REVERSE,
                "%.3f ms against %.3f ms%s" % (a, ref, _rtt_floor_note(lat, ref)))
    mem = r.get("memory", {})
    if "agent_idle_mib" in mem:
        i = mem["agent_idle_mib"]
        add("agent RSS idle (MiB)", i, "<= 40 MB (%.1f MiB)" % TARGET_AGENT_IDLE_MIB,
            i <= TARGET_AGENT_IDLE_MIB, "%.1f MiB over" % (i - TARGET_AGENT_IDLE_MIB))
    if "sessions_many" in mem:
        s = mem["sessions_many"]["per_session_kib"]
        add("agent RSS per open session (KiB, %d sessions)" % mem["sessions_many"]["opened"],
            s, "<= %.0f KiB" % TARGET_PER_SESSION_KIB, s <= TARGET_PER_SESSION_KIB,
            "%.0f KiB over" % (s - TARGET_PER_SESSION_KIB))
    if "relay" in mem:
        m = mem["relay"]
        n = m["pairs"]
        # the target is for 5000 sessions: fewer (--quick) are extrapolated linearly
        rel = m["rss_before_mib"] + m["per_session_kib"] * 5000 / 1024.0
        name = "relay RSS with 5000 paired sessions (MiB%s)" % (
            "" if n == 5000 else ", extrapolated from %d" % n)
        if n == 5000:
            rel = m["rss_after_traffic_mib"]
        add(name, rel, "<= %.0f MiB" % TARGET_RELAY_MIB, rel <= TARGET_RELAY_MIB,
            "%.0f MiB over" % (rel - TARGET_RELAY_MIB))
    return rows


def table(r: Dict[str, Any]) -> str:  # noqa: C901 - a report table: one branch per optional row
    lines: List[str] = []

    def row(section: str, metric: str, value: str) -> None:
        lines.append("| %s | %s | %s |" % (section, metric, value))

    lines.append("| section | figure | value |")
    lines.append("|---|---|---|")
    tp = r.get("throughput")
    if tp:
        for d in ("up", "down"):
            g = tp[d]["gbit_s"]
            cpu = tp[d].get("cpu_s_per_gib", {})
            for name in ["direct", "tunnel"] + [k + v for k in ("ssh_L", "ssh_reverse")
                                                for v in VARIANTS]:
                per = cpu.get(name, {})
                extra = ("  (CPU s/GiB: %s)" % ", ".join("%s %.2f" % kv for kv in per.items())
                         if per else "")
                row("1 throughput %s" % d, _label(name, r), "%.2f Gbit/s%s" % (g[name], extra))
            ratios = tp[d]["ratio_tunnel_vs"]
            row("1 throughput %s" % d, "ratio ours / ssh -L default, aes128-gcm, fastest",
                " / ".join("%.2f" % ratios["ssh_L" + v] for v in VARIANTS))
            row("1 throughput %s" % d, "ratio ours / reverse default, aes128-gcm, fastest",
                " / ".join("%.2f" % ratios["ssh_reverse" + v] for v in VARIANTS))
            t = cpu.get("tunnel", {})
            s_l = cpu.get("ssh_L_fastest", {})
            if t and s_l:
                row("1 throughput %s" % d, "CPU s/GiB agent / sshd, console / ssh (fastest)",
                    "%.2f / %.2f, %.2f / %.2f" % (t["agent"], s_l["sshd"], t["console"],
                                                  s_l["ssh"]))
    ms = r.get("many_streams")
    if ms:
        for n in ms["streams"]:
            row("2 many streams", "%d streams, ours / ssh -L fastest / reverse default / "
                "reverse fastest" % n, "%.2f / %.2f / %.2f / %.2f Gbit/s"
                % (ms["tunnel_gbit_s"][str(n)], ms["ssh_L_fastest_gbit_s"][str(n)],
                   ms["ssh_reverse_gbit_s"][str(n)], ms["ssh_reverse_fastest_gbit_s"][str(n)]))
    setup = r.get("session_setup_ms", {})
    if "warm" in setup:
        w = setup["warm"]
        row("3 session set-up", "warm, request → first byte p50 / p99 (%d runs)" % w["runs"],
            "%.1f / %.1f ms" % (w["first_byte_p50"], w["first_byte_p99"]))
        row("3 session set-up", "warm, request → tunnel up p50 / p99",
            "%.1f / %.1f ms" % (w["tunnel_up_p50"], w["tunnel_up_p99"]))
    if "cold" in setup:
        c = setup["cold"]
        row("3 session set-up", "cold `stdio` launch → first byte p50 / p99 (%d runs)"
            % c["runs"], "%.0f / %.0f ms" % (c["stdio_first_byte_p50"],
                                             c["stdio_first_byte_p99"]))
        row("3 session set-up", "fresh `ssh … true` p50 / p99",
            "%.0f / %.0f ms" % (c["ssh_true_p50"], c["ssh_true_p99"]))
        row("3 session set-up", "`remote-gevent-console --version` p50 (start-up floor)",
            "%.0f ms" % c["console_version_p50"])
        if "stdio_via_master_p50" in c:
            row("3 session set-up", "`stdio --master use` (running master) → first byte p50 / p99",
                "%.0f / %.0f ms" % (c["stdio_via_master_p50"], c["stdio_via_master_p99"]))
            row("3 session set-up", "`ssh … true` via a ControlMaster p50 / p99",
                "%.0f / %.0f ms" % (c["ssh_true_via_controlmaster_p50"],
                                    c["ssh_true_via_controlmaster_p99"]))
    lat = r.get("latency_ms")
    if lat:
        names = ["direct", "tunnel", "stdio", "stdio_via_master"] + [
            k + v for k in ("ssh_L", "ssh_reverse") for v in VARIANTS] + [
            "floor_chain_" + style for style in FLOOR_STYLES]
        for name in names:
            if name not in lat:
                continue
            extra = ""
            if name != "direct":
                extra = " (added %.3f / %.3f)" % (lat[name]["added_p50"], lat[name]["added_p99"])
            row("4 1-byte RTT", "%s p50 / p99" % _label(name, r),
                "%.3f / %.3f ms%s" % (lat[name]["p50"], lat[name]["p99"], extra))
        for name in ["tunnel", "ssh_L_fastest", "ssh_reverse_fastest"] + [
                "floor_chain_" + style for style in FLOOR_STYLES]:
            per_rt = dict(lat.get(name, {}).get("cpu_us_per_rt", {}))
            if per_rt:
                machine = per_rt.pop("machine", float("nan"))
                row("4 1-byte RTT", "%s CPU us per round trip" % _label(name, r),
                    "%s = %.0f (whole machine %.0f)" % (
                        " + ".join("%s %.0f" % kv for kv in per_rt.items()),
                        sum(per_rt.values()), machine))
    mem = r.get("memory", {})
    if "agent_idle_mib" in mem:
        row("5 memory", "agent RSS idle (fresh)", "%.1f MiB" % mem["agent_idle_mib"])
    for key in ("sessions_10", "sessions_many"):
        if key in mem:
            m = mem[key]
            row("5 memory", "agent RSS with %d open sessions" % m["opened"],
                "%.1f MiB (from %.1f; %.1f KiB/session; %d fds)" % (
                    m["agent_rss_mib"], m["agent_rss_before_mib"], m["per_session_kib"],
                    m["agent_fds"]))
    if "relay" in mem:
        m = mem["relay"]
        row("5 memory", "relay RSS with %d paired idle sessions" % m["pairs"],
            "%.1f MiB (empty %.1f; %.1f KiB/session)" % (
                m["rss_after_traffic_mib"], m["rss_before_mib"], m["per_session_kib"]))
    floor = r.get("cpu_floor_s_per_gib")
    if floor:
        row("7 CPU floor", "bare forwarder s/GiB: copy; seal, open with libsodium; "
            "with OpenSSL", "%.2f; %.2f, %.2f; %.2f, %.2f" % (
                floor["copy"], floor["seal-libsodium"], floor["open-libsodium"],
                floor["seal-openssl"], floor["open-openssl"]))
    cp = r.get("control_plane")
    if cp:
        for key, label in (("refuse", "refusals (target not permitted)"),
                           ("accept_close", "accepts (+ close)")):
            c = cp[key]
            row("6 control plane", label, "%.0f req/s (%s per agent CPU-s; %s)"
                % (c["per_s"], _per_cpu(c), ", ".join(
                    "%s %d" % kv for kv in sorted(c["outcomes"].items()))))
    out = "\n".join(lines)
    rows = targets(r)
    if rows:
        out += "\n\n| target (issues 6, 17) | figure | goal | verdict |\n|---|---|---|---|\n"
        out += "\n".join("| %s | %.3g | %s | %s |" % (t["target"], t["value"], t["goal"],
                                                     t["verdict"]) for t in rows)
    return out


def _label(name: str, r: Dict[str, Any]) -> str:
    """``ssh_L_fastest`` → ``ssh_L -c aes128-gcm@openssh.com (fastest)``."""
    m = r.get("machine", {})
    if name.endswith("_aes128gcm"):
        return name[:-len("_aes128gcm")] + " -c aes128-gcm@openssh.com"
    if name.endswith("_fastest"):
        return name[:-len("_fastest")] + " -c %s (fastest)" % m.get("ssh_fastest_cipher", "?")
    if name.startswith("ssh_"):
        return name + " (default %s)" % m.get("ssh_cipher", "?")
    if name == "tunnel":
        return "ours (forward)"
    if name == "stdio":
        return "ours (stdio, own session)"
    if name == "stdio_via_master":
        return "ours (stdio via master)"
    if name.startswith("floor_chain_"):
        return "floor: the same chain, %s hops doing only frame + AEAD" % name[len(
            "floor_chain_"):]
    return name


def _per_cpu(figures: Dict[str, Any]) -> str:
    """Requests per agent CPU-second, or n/a when the run was too short to measure CPU."""
    value = figures.get("per_agent_cpu_s")
    return "n/a" if value is None else "%.0f" % value


