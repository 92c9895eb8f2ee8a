#!/usr/bin/env python3
"""Test helper: what kubelet does with containerd, through CRI v1 (gRPC), and
OCI image archives built from Debian binaries (no registry needed).

Subcommands print one JSON object on stdout. Used by tests/tests/runtimes.rs.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time

RUNTIME_SOCK_HELP = "containerd's socket path"


def build_image(out, name, files, entrypoint, env):
    """An OCI image archive with one layer holding `files` (dest -> source or
    ('link', target)), importable with `ctr images import` and `podman load`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        dirs = set()
        for dest in files:
            parts = dest.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for dest, src in sorted(files.items()):
            if isinstance(src, tuple):
                info = tarfile.TarInfo(dest.strip("/"))
                info.type = tarfile.SYMTYPE
                info.linkname = src[1]
                tar.addfile(info)
            else:
                tar.add(src, arcname=dest.strip("/"))
    layer_bytes = layer.getvalue()
    blobs = {}

    def blob(data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_desc = blob(layer_bytes, "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": env},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": name,
                                    "io.containerd.image.name": name}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}
    with tarfile.open(out, "w") as tar:
        def add(path, data):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":")[1], data)
    return {"archive": out, "name": name}


def cmd_images(args):
    pause = build_image(os.path.join(args.dir, "pause.tar"), "localhost/dpt-pause:1",
                        {"/pause": "/usr/bin/catatonit"}, ["/pause", "-P"], [])
    files = {"/bin/busybox": "/bin/busybox"}
    for applet in ["sh", "httpd", "wget", "sleep", "ip", "ping", "cat", "echo", "mkdir"]:
        files["/bin/" + applet] = ("link", "busybox")
    files["/www/index.html"] = os.path.join(args.dir, "index.html")
    with open(files["/www/index.html"], "w") as f:
        f.write("hello from a pod made by containerd\n")
    busybox = build_image(os.path.join(args.dir, "busybox.tar"), "localhost/dpt-busybox:1", files,
                          ["/bin/sh"], ["PATH=/bin"])
    return {"pause": pause, "busybox": busybox}


def stub(sock):
    import grpc
    from cri_api.v1 import api_pb2_grpc
    channel = grpc.insecure_channel("unix://" + sock)
    return api_pb2_grpc.RuntimeServiceStub(channel)


def sandbox_config(name, namespace, uid, log_dir):
    from cri_api.v1 import api_pb2 as cri
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
        hostname=name,
        log_directory=log_dir,
        linux=cri.LinuxPodSandboxConfig(),
    )


def cmd_run_pod(args):
    from cri_api.v1 import api_pb2 as cri
    rt = stub(args.sock)
    config = sandbox_config(args.name, args.namespace, args.uid, args.log_dir)
    started = time.monotonic()
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config)).pod_sandbox_id
    elapsed = time.monotonic() - started
    status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    return {"id": pod_id, "ip": status.network.ip, "run_seconds": elapsed}


def cmd_start_container(args):
    from cri_api.v1 import api_pb2 as cri
    rt = stub(args.sock)
    sandbox = sandbox_config(args.name, args.namespace, args.uid, args.log_dir)
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=args.container, attempt=0),
        image=cri.ImageSpec(image=args.image),
        command=args.command,
        log_path=args.container + ".log",
        linux=cri.LinuxContainerConfig(),
    )
    cid = rt.CreateContainer(cri.CreateContainerRequest(
        pod_sandbox_id=args.pod, config=config, sandbox_config=sandbox)).container_id
    rt.StartContainer(cri.StartContainerRequest(container_id=cid))
    return {"id": cid}


def cmd_remove_pod(args):
    from cri_api.v1 import api_pb2 as cri
    rt = stub(args.sock)
    rt.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=args.pod))
    rt.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=args.pod))
    return {"removed": args.pod}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("images", help="build the pause and busybox OCI archives")
    s.add_argument("--dir", required=True)
    s.set_defaults(func=cmd_images)
    for name, func in [("run-pod", cmd_run_pod), ("start-container", cmd_start_container)]:
        s = sub.add_parser(name)
        s.add_argument("--sock", required=True, help=RUNTIME_SOCK_HELP)
        s.add_argument("--name", required=True)
        s.add_argument("--namespace", default="default")
        s.add_argument("--uid", required=True)
        s.add_argument("--log-dir", required=True)
        s.set_defaults(func=func)
        if name == "start-container":
            s.add_argument("--pod", required=True)
            s.add_argument("--container", required=True)
            s.add_argument("--image", required=True)
            s.add_argument("command", nargs="+")
    s = sub.add_parser("remove-pod")
    s.add_argument("--sock", required=True, help=RUNTIME_SOCK_HELP)
    s.add_argument("--pod", required=True)
    s.set_defaults(func=cmd_remove_pod)
    args = p.parse_args()
    try:
        print(json.dumps(args.func(args)))
    except Exception as e:  # noqa: BLE001 - reported to the Rust test verbatim
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)


if __name__ == "__main__":
    main()
