#!/usr/bin/env python3
"""What herd-gateway's user-space work could still buy, from a `herd bench proxy --json` file.

    herd bench proxy --scenarios hello,session,h2 --json raw.json
    infra/bench/user-kernel.py raw.json

For every (scenario, concurrency), the medians over the rounds of each proxy's CPU per request
split into user and kernel time (the run's utime and stime, 10 ms ticks, so a split good to a
few per cent over an 8 s run), and two bounds for herd: its kernel time alone against nginx's
whole CPU per request (the lowest CPU ratio any user-space change could reach, with herd's
kernel work as it is), and the req/s ratios herd would reach if its user time were free. Without
a CPU budget req/s is the machine's: the load generator and the upstreams share it, so herd's
req/s scale by (all CPU per request) / (all minus herd's user time). With one (`--proxy-cpus`)
req/s is the budget over the proxy's CPU per request. A target beyond these bounds needs less
kernel work (fewer system calls, segments or wake-ups) or a different machine, not faster code.
The last column says what 1.2x each peer's req/s (issue 16's target) asks of herd by the same
reckoning: the CPU per request herd would have to shed, in µs and as a share of its user time,
"met" where it is met, and "beyond its user time" where even all of it would not do (kernel
work or the upstreams' could still be cut). Without a budget that reckoning holds the machine's
idle share as it was in herd's runs (req/s times CPU per request is the CPUs kept busy, which
differs a little between proxies), and it needs the upstreams' and the load generator's CPU
in the file ("n/a" without them). docs/performance.md, sections 54 and 60.
"""

import json
import statistics
import sys


def per_request(run, seconds):
    return seconds / run["requests"] * 1e6


def figures(runs):
    """Medians over the rounds of one (scenario, concurrency, target)."""

    def median(values):
        return statistics.median(values)

    out = {"rps": median([r["rps"] for r in runs])}
    if runs[0]["cpu_seconds"] is None:
        return out
    out["cpu"] = median([per_request(r, r["cpu_seconds"]) for r in runs])
    out["kernel"] = median([per_request(r, r["cpu_system_seconds"]) for r in runs])
    out["user"] = median(
        [per_request(r, r["cpu_seconds"] - r["cpu_system_seconds"]) for r in runs]
    )

    if any(r["upstream_cpu_seconds"] is None or r["load_cpu_seconds"] is None for r in runs):
        return out  # the rest of the machine was not measured: no machine-wide bounds

    def rest(r):
        return r["upstream_cpu_seconds"] + r["load_cpu_seconds"]

    def without_user(r):
        return r["rps"] * (r["cpu_seconds"] + rest(r)) / (r["cpu_system_seconds"] + rest(r))

    out["rps_without_user"] = median([without_user(r) for r in runs])
    out["all"] = median([per_request(r, r["cpu_seconds"] + rest(r)) for r in runs])
    return out


def asked(herd, peer, budget, ratio=1.2):
    """What `ratio` x the peer's req/s asks of herd: the CPU per request (µs) it would shed.

    With a budget req/s is the budget over the proxy's CPU per request, so the proxy's CPU must
    shrink by the factor missing; without one req/s is the machine's, so the machine's CPU per
    request through herd (herd, upstreams, load generator) must."""
    missing = ratio * peer["rps"] / herd["rps"]
    if missing <= 1:
        return 0.0
    cpu = herd["cpu"] if budget else herd.get("all")
    return None if cpu is None else cpu * (1 - 1 / missing)


def describe(cut, user):
    if cut is None:
        return "n/a"
    if cut == 0:
        return "met"
    if cut >= user:
        return f"beyond its user time ({cut:.1f} µs)"
    return f"{cut:.1f} µs ({cut / user:.0%} of user)"


def main(path):
    try:
        with open(path) as file:
            results = json.load(file)["results"]
        budget = results["options"].get("proxy_cpus")
        runs = [r for r in results["runs"] if not r["error"] and r["requests"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"{path}: not the --json file of a herd bench proxy run ({error!r})")
    cells = {}
    for run in runs:
        cells.setdefault((run["scenario"], run["concurrency"], run["target"]), []).append(run)
    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    concurrencies = sorted({r["concurrency"] for r in runs})
    print(
        "| scenario, c | herd user · kernel µs | HAProxy user · kernel µs | nginx user · kernel µs "
        "| herd CPU / nginx | herd kernel alone / nginx CPU | herd req/s / HAProxy · / nginx "
        "| with herd's user time free: / HAProxy · / nginx "
        "| 1.2× asks of herd: / HAProxy · / nginx |"
    )
    print("|---|---|---|---|---:|---:|---|---|---|")
    for scenario in scenarios:
        for concurrency in concurrencies:
            try:
                herd, haproxy, nginx = (
                    figures(cells[(scenario, concurrency, target)])
                    for target in ("herd", "haproxy", "nginx")
                )
            except KeyError:
                continue  # a target left out of this run
            if any("cpu" not in proxy for proxy in (herd, haproxy, nginx)):
                print(f"| {scenario}, {concurrency} | no CPU figures in this run |")
                continue
            if budget:
                ratios = [peer["cpu"] / herd["kernel"] for peer in (haproxy, nginx)]
            elif "rps_without_user" in herd:
                ratios = [herd["rps_without_user"] / peer["rps"] for peer in (haproxy, nginx)]
            else:
                ratios = []
            free = " · ".join(f"{ratio:.2f}×" for ratio in ratios) or "n/a"
            print(
                f"| {scenario}, {concurrency} "
                f"| {herd['user']:.1f} · {herd['kernel']:.1f} "
                f"| {haproxy['user']:.1f} · {haproxy['kernel']:.1f} "
                f"| {nginx['user']:.1f} · {nginx['kernel']:.1f} "
                f"| {herd['cpu'] / nginx['cpu']:.2f}× | {herd['kernel'] / nginx['cpu']:.2f}× "
                f"| {herd['rps'] / haproxy['rps']:.2f}× · {herd['rps'] / nginx['rps']:.2f}× "
                f"| {free} "
                f"| {describe(asked(herd, haproxy, budget), herd['user'])} "
                f"· {describe(asked(herd, nginx, budget), herd['user'])} |"
            )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: infra/bench/user-kernel.py RAW.json (from herd bench proxy --json)")
    main(sys.argv[1])
