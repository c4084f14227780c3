"""Options the fleet commands (worker, submit, status, jobs) share: where the broker and the results are."""
from __future__ import annotations

import argparse
from typing import Any


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=None, metavar="URL",
                   help="Celery broker URL (default $VHDCORE_BROKER, else redis://127.0.0.1:6379/0); RabbitMQ: "
                        "amqp://user:pass@host:5672/vhost with --result-backend")
    p.add_argument("--result-backend", default=None, metavar="URL",
                   help="where task states are kept (default: the broker's URL when it is Redis)")


def app_from_args(args: argparse.Namespace, **kw: Any) -> Any:
    try:
        from ..jobs.celeryapp import make_app
    except ModuleNotFoundError as e:  # celery is an extra
        raise ValueError(f"the fleet commands need the 'fleet' extra (pip install 'vhdcore[fleet]'): {e}") from None
    return make_app(args.broker, args.result_backend, **kw)


def status_line(j: dict[str, Any]) -> str:
    from ._common import human

    pct = j.get("percent")
    parts = [f"{j['job']}", f"{j.get('state', '?'):<10}", f"{pct:5.1f}%" if pct is not None else "    ?%"]
    if j.get("stage"):
        sp = j.get("stage_percent")
        parts.append(f"{j['stage']}" + (f" {sp:.1f}%" if sp is not None else ""))
    if j.get("total"):
        parts.append(f"{human(j.get('done') or 0)}/{human(j['total'])}")
    if j.get("rate"):
        parts.append(f"{human(j['rate'])}/s")
    if j.get("eta") is not None and j.get("state") not in ("complete", "failed"):
        parts.append(f"ETA {j['eta']:.0f} s")
    if j.get("host"):
        parts.append(f"host {j['host']}")
    err = j.get("error")
    if isinstance(err, dict) and err.get("message") and j.get("state") in ("failed", "retry"):
        parts.append(f"{err.get('code')}: {err['message']}")
    return "  ".join(parts)
