"""kub_files/: every manifest is a valid Kubernetes object whose command is a valid call of our own CLI, and every
job runs the recipe (config/recipe.yaml) at cluster size."""
import fnmatch
from pathlib import Path

import pytest
import yaml

from AutoEncoder.trainer import parse_args as ae_args
from dataset.prepare import parse_args as prepare_args
from ddpm.export import parse_args as export_args
from ddpm.latents import parse_args as latents_args
from ddpm.trainer import parse_args as unet_args
from thinslice.config import load_config, load_layers, recipe_differences
from evaluation.interpolate_cli import parse_args as interpolate_args

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "kub_files").glob("*.yaml"))
PARSERS = {"dataset/prepare.py": prepare_args, "train/generate_training_latent.py": latents_args,
           "train/train_autoencoder.py": ae_args, "train/train_unet_latent.py": unet_args,
           "evaluation/interpolate.py": interpolate_args, "ddpm/export.py": export_args}
RECIPE = ROOT / "config" / "recipe.yaml"
IMAGE = "registry.example.com/thinslice:0.1.0"
DATA_ROOT = "/data"


def load(path):
    return yaml.safe_load(path.read_text())


def pod_specs(doc) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]["spec"]]
    return []


def invocation(container) -> tuple[str, list[str]]:
    """(script, its arguments) out of `python script ...`, `python -m module ...` (script: the module's file) or
    `torchrun [torchrun flags] script ...`."""
    argv = container["command"] + container.get("args", [])
    if "-m" in argv:
        i = argv.index("-m") + 1
        return argv[i].replace(".", "/") + ".py", argv[i + 1:]
    i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
    return argv[i], argv[i + 1:]


def jobs() -> list[tuple[str, str, list[str], dict]]:
    """(manifest name, script, its arguments, the container) of every job's first pod (a PyTorchJob's pods agree)."""
    out = []
    for path in MANIFESTS:
        doc = load(path)
        specs = pod_specs(doc)
        if specs:
            c = specs[0]["containers"][0]
            out.append((path.name, *invocation(c), c))
    return out


def test_the_manifests_are_all_there():
    names = {p.name for p in MANIFESTS}
    assert {"pvc.yaml", "prepare-job.yaml", "latents-job.yaml", "ae-stage1-pytorchjob.yaml",
            "ae-stage2-pytorchjob.yaml", "unet-pytorchjob.yaml", "export-job.yaml", "interpolate-job.yaml"} <= names


def test_every_job_runs_the_recipe_at_cluster_size():
    """The scale path is the recipe: each job names a cluster config that differs from config/recipe.yaml only in
    size keys and declared differences, and the knobs that made the model work are on where each step reads them."""
    seen = set()
    for name, script, argv, _ in jobs():
        args = PARSERS[script](argv)
        if script == "ddpm/export.py":  # copies weights; the config travels inside the checkpoints
            continue
        assert args.config is not None and str(args.config).startswith("config/cluster"), (name, args.config)
        assert recipe_differences(ROOT / args.config, RECIPE) == [], name
        cfg = load_config(ROOT / args.config)
        seen.add(script)
        if script == "train/train_autoencoder.py":
            assert cfg.autoencoder.compression[2] <= 2 and cfg.autoencoder.regularizer == "kl", name
            assert cfg.loss.perceptual_weight > 0 and cfg.loss.adv_weight > 0, name  # kept on at cluster size
        if script == "train/generate_training_latent.py":
            assert not args.no_pairs and cfg.latents.crops_per_pair > 0 and cfg.latents.inplane, name
        if script == "train/train_unet_latent.py":
            assert cfg.unet_train.final_step_fraction > 0 and cfg.unet.cond_image, name
            assert cfg.diffusion.sample_steps == 1, name
        if script == "evaluation/interpolate.py":
            assert cfg.diffusion.sample_steps == 1 and cfg.interpolate.adapt_steps > 0, name
    assert seen == set(PARSERS) - {"ddpm/export.py"}


def test_the_image_holds_what_the_jobs_run():
    """The Dockerfile copies the project (scripts, modules, config/) into /app, and .dockerignore keeps none of
    what a job names out of the image: its script and its config with every file that config includes."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY . ." in dockerfile and "WORKDIR /app" in dockerfile and "pip install --no-deps -e ." in dockerfile
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for name, script, argv, _ in jobs():
        needed = [ROOT / script]
        config = getattr(PARSERS[script](argv), "config", None)
        if config is not None:
            needed += [p for p, _ in load_layers(ROOT / config)]
        for path in needed:
            rel = path.resolve().relative_to(ROOT)
            assert path.is_file(), (name, rel)
            assert not any(fnmatch.fnmatch(str(rel), pat) or fnmatch.fnmatch(part, pat.removeprefix("**/"))
                           for pat in ignored for part in rel.parts), (name, rel)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_has_the_fields_kubernetes_requires(path):
    doc = load(path)
    assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc) and doc["metadata"]["name"]
    if doc["kind"] == "PersistentVolumeClaim":
        assert doc["spec"]["accessModes"] == ["ReadWriteMany"] and doc["spec"]["resources"]["requests"]["storage"]
        return
    assert doc["apiVersion"] == {"Job": "batch/v1", "PyTorchJob": "kubeflow.org/v1"}[doc["kind"]]
    if doc["kind"] == "PyTorchJob":
        spec = doc["spec"]
        assert set(spec["pytorchReplicaSpecs"]) == {"Master", "Worker"}
        assert spec["elasticPolicy"]["rdzvBackend"] == "c10d" and spec["elasticPolicy"]["maxRestarts"] >= 1
        gpus = {int(s["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) for s in pod_specs(doc)}
        assert gpus == {int(spec["nprocPerNode"])}  # one process per GPU of the pod
    else:
        assert doc["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    for spec in pod_specs(doc):
        c = spec["containers"][0]
        assert c["name"] and c["image"] and c["command"]
        if doc["kind"] == "PyTorchJob":
            assert c["name"] == "pytorch"  # the operator looks the container up by this name
        assert spec["securityContext"]["runAsUser"] != 0  # the image's non-root user
        for what in ("requests", "limits"):
            assert c["resources"][what]["cpu"] and c["resources"][what]["memory"]
        if "nvidia.com/gpu" in c["resources"]["limits"]:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
            if c["command"] == ["torchrun"]:  # DataLoader workers need more shared memory than a pod's 64 MB
                assert "/dev/shm" in {m["mountPath"] for m in c["volumeMounts"]}


@pytest.mark.parametrize("path", [p for p in MANIFESTS if load(p)["kind"] != "PersistentVolumeClaim"], ids=lambda p: p.name)
def test_each_command_is_a_valid_call_of_our_cli(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the image's working directory is the project root
    for spec in pod_specs(load(path)):
        c = spec["containers"][0]
        assert c["workingDir"] == "/app"
        script, argv = invocation(c)
        assert (ROOT / script).is_file(), script
        args = PARSERS[script](argv)  # exits (SystemExit) on an unknown or missing argument
        if getattr(args, "config", None):
            load_config(ROOT / args.config)
        if c["command"] == ["torchrun"] and "--standalone" not in c["args"]:
            assert "--nproc_per_node" not in " ".join(c["args"])  # the operator's PET_NPROC_PER_NODE decides


def test_image_volume_and_paths_agree_across_manifests():
    pvc = load(ROOT / "kub_files" / "pvc.yaml")["metadata"]["name"]
    produced, consumed = set(), set()
    for path in MANIFESTS:
        doc = load(path)
        for spec in pod_specs(doc):
            c = spec["containers"][0]
            assert c["image"] == IMAGE, path.name
            claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
            assert claims == {pvc}, path.name
            assert {"name": "data", "mountPath": DATA_ROOT} in c["volumeMounts"]
            script, argv = invocation(c)
            args = vars(PARSERS[script](argv))
            if args.get("output"):
                produced.add(str(args["output"]))
            for key in ("cache", "latents", "checkpoint", "autoencoder", "unet", "init_from"):
                if args.get(key) and not isinstance(args[key], (list, tuple)):
                    consumed.add(str(args[key]))
            if args.get("export_autoencoder"):  # (the run's checkpoint, the exported file)
                consumed.add(str(args["export_autoencoder"][0]))
                produced.add(str(args["export_autoencoder"][1]))
    for path in consumed:  # every path a step reads is written by another step (checkpoints under its run folder)
        assert path.startswith(DATA_ROOT) and any(path == p or path.startswith(p + "/") for p in produced), path
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "USER thinslice" in dockerfile and "useradd --create-home --uid 1000" in dockerfile
