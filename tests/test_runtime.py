"""The local Ray default must listen on loopback only."""

import subprocess
import sys
import textwrap


def test_local_ray_listens_on_loopback_only(tmp_path):
    script = textwrap.dedent(
        """
        import os, subprocess, ray
        from rdcd.runtime import init_ray
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        init_ray({"num_cpus": 1})
        import psutil
        node = ray._private.worker.global_worker.node
        print("NODE_IP", node.node_ip_address)
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    print("LISTEN", f"{conn.laddr.ip}:{conn.laddr.port}")
        ray.shutdown()
        """
    )
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "NODE_IP 127.0.0.1" in lines
    listening = [line.split()[1] for line in lines if line.startswith("LISTEN")]
    assert len(listening) >= 3, result.stdout
    for address in listening:
        assert address.startswith(("127.0.0.1:", "::1:", "::ffff:127.0.0.1:")), address
