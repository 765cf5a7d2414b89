"""More than one machine: two Ray nodes on 127.0.0.1 (ray.cluster_utils.Cluster, one CPU
each). Embedding, index building and all-pairs work land on both nodes and give exactly what
one node gives; a node killed while it runs part of a night (its raylet gone, no warning) loses
nothing: retries or a resume finish the night.

The cluster lives in a child process: one Ray per process, and this one already runs the
session's local Ray (the single-node reference).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nightly_data import NIGHTS, config_for, model_card, write_nights

from pipelines.nightly import run_nightly

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(420)
CHILD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
"""A test cluster without token auth; the driver must agree with its nodes on that."""
EMBED_NAMES = ("ReadShards", "MapBatches", "MapWorker", "EmbedStage", "decode")


def cluster_config(card: str, history: str, incoming: str) -> dict:
    """Small enough that every stage splits into several tasks, and that the surviving
    one-CPU node can still run the whole embed pipeline (fractional CPUs). One model actor:
    Ray Data 2.60 fails a pipeline when a second, still-pending actor is cancelled because the
    first already finished the few images (it counts that as an actor init death)."""
    config = config_for(card, history, incoming)
    config["input"]["files_per_shard"] = 2
    config["embed"].update(
        actors=1, actor_num_cpus=0.25, decode_num_cpus=0.5, write_num_cpus=0.25, batch_size=4
    )
    config["index"].update(factory="IVF2,Flat", shard_vectors=3)
    config["nightly"]["max_index_parts"] = 2  # compaction into an on-disk part, too
    config["match"]["query_rows"] = 3
    config["nightly"]["task_cpus"] = 0.25
    return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _embed_nodes(address: str, job_id: str) -> list[str]:
    """Nodes that ran the embed pipeline's tasks and actors (Ray state API)."""
    from ray.util.state import list_actors, list_tasks

    filters = [("job_id", "=", job_id)]
    tasks = list_tasks(address, filters=filters, detail=True, limit=10000)
    actors = list_actors(address, filters=filters, detail=True, limit=10000)
    nodes = {t.node_id for t in tasks if any(n in t.name for n in EMBED_NAMES) and t.node_id}
    nodes |= {a.node_id for a in actors if any(n in a.class_name for n in EMBED_NAMES)}
    return sorted(nodes)


def _running_on(address: str, node_id: str, job_id: str) -> dict[str, str]:
    """Task id -> name of the job's tasks the state API reports RUNNING on that node."""
    from ray.util.state import list_tasks

    filters = [("job_id", "=", job_id), ("state", "=", "RUNNING")]
    running = list_tasks(address, filters=filters, detail=True, limit=10000)
    return {t.task_id: t.name for t in running if t.node_id == node_id}


def _stages_done(history: str, date: str) -> list[str]:
    """The night's finished stages, from the markers the run writes as each one ends."""
    markers = Path(history).glob(f"versions/*/work/nightly-{date}/_stages/*.json")
    return sorted(marker.stem for marker in markers)


def _kill_mid_night(cluster, worker, address: str, job_id: str, history: str, second: dict):
    """Run night 2 in a thread and kill the worker node while it runs: as soon as the state
    API shows one of the night's tasks running there, or at the latest when the embed stage
    has finished (ingest, index, pairs, groups and commit still ahead). State records left
    over from night 1 (a finished task can still read RUNNING) do not count."""
    stale = set(_running_on(address, worker.node_id, job_id))
    outcome: dict = {}

    def night() -> None:
        try:
            run_nightly(copy.deepcopy(second))
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported, then resumed below
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=night, daemon=True)
    thread.start()
    date = second["nightly"]["date"]
    killed: dict = {}
    while thread.is_alive() and not killed:
        running = _running_on(address, worker.node_id, job_id)
        tasks = sorted(name for task_id, name in running.items() if task_id not in stale)
        stages = _stages_done(history, date)
        if tasks or "embed" in stages:
            killed = {"tasks": tasks, "stages_done": stages, "run_alive": thread.is_alive()}
            cluster.remove_node(worker, allow_graceful=False)
        else:
            time.sleep(0.05)
    thread.join(timeout=240)
    return {"killed": killed, "first_attempt": outcome, "hung": thread.is_alive()}


def child(card: str, history: str, incoming: str, report: str) -> None:
    """Two nights on a two-node cluster; the worker node is killed during night 2. Runs with
    CHILD_ENV (Ray reads it when first imported, which importing this module already does)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
            # notice a dead node in ~2 s instead of ~30 s: the test waits for it
            # and report task states every 100 ms, so the test sees what runs where
            "_system_config": {
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 4,
                "task_events_report_interval_ms": 100,
            },
        },
    )
    worker = cluster.add_node(
        num_cpus=1, node_ip_address="127.0.0.1", dashboard_agent_listen_port=_free_port()
    )
    result: dict = {"nodes": [], "night1": {}, "night2": {}}
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        job_id = ray.get_runtime_context().get_job_id()
        address = cluster.address  # the state API must ask this cluster, not another one
        result["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        config = cluster_config(card, history, incoming)
        first = copy.deepcopy(config)
        first["nightly"]["date"] = NIGHTS[0]
        run_nightly(first)
        manifest = Path(history).glob(f"versions/*/work/nightly-{NIGHTS[0]}/manifest.json")
        result["night1"] = {
            "placement": json.loads(next(manifest).read_text())["placement"],
            "embed": _embed_nodes(address, job_id),
        }
        second = copy.deepcopy(config)
        second["nightly"]["date"] = NIGHTS[1]
        result["night2"] = _kill_mid_night(cluster, worker, address, job_id, history, second)
        if result["night2"]["hung"]:
            return
        if "ok" not in result["night2"]["first_attempt"]:
            run_nightly(copy.deepcopy(second))
            result["night2"]["resumed"] = True
    finally:
        Path(report).write_text(json.dumps(result))
        ray.shutdown()
        cluster.shutdown()


def published(history: Path) -> dict[str, list]:
    import duckdb

    (version,) = (history / "versions").iterdir()
    out = {}
    for table, columns in (
        ("pairs", "image_id_a, image_id_b, round(score, 5), exact, run_id, model_id, date"),
        ("groups", "image_id, group_id, group_size, is_keeper, keep_reason, bucket"),
        ("group_changes", "image_id, group_id, previous_group_id, change, run_id, date"),
        ("descriptors", "image_id, content_hash, model_id, date"),
        ("errors", "image_id, stage, date"),
    ):
        out[table] = duckdb.sql(
            f"SELECT {columns} FROM read_parquet('{version}/{table}/*/*.parquet', "
            "hive_partitioning = true) ORDER BY ALL"
        ).fetchall()
    return out


def test_two_nodes_share_the_work_and_survive_losing_one(tmp_path, tmp_path_factory, ray_session):
    card = model_card(tmp_path_factory.getbasetemp() / "nightly-models", "a", seed=0)
    paths = write_nights(tmp_path)
    history, report = tmp_path / "cluster-history", tmp_path / "report.json"
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]; import test_multinode as t; "
        "t.child(*sys.argv[2:])"
    )
    done = subprocess.run(
        [
            sys.executable, "-c", code, str(REPO / "tests"), card, str(history),
            str(paths["incoming"]), str(report),
        ],
        cwd=REPO, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    (tmp_path / "child.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert len(result["nodes"]) == 2
    both = set(result["nodes"])
    placement = result["night1"]["placement"]
    assert set(result["night1"]["embed"]) == both
    assert set(placement["index"]) == both
    assert set(placement["pairs"]) == both
    night2 = result["night2"]
    killed = night2["killed"]
    assert killed and killed["run_alive"] and not night2["hung"], night2
    assert "commit" not in killed["stages_done"], night2

    single = tmp_path / "single-history"
    config = cluster_config(card, str(single), str(paths["incoming"]))
    for date in NIGHTS[:2]:
        config["nightly"]["date"] = date
        run_nightly(copy.deepcopy(config))
    assert published(history) == published(single)
