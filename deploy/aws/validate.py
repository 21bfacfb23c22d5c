#!/usr/bin/env python3
"""Checks ECS task definitions for hikkoshi offline, before `aws ecs register-task-definition` sees them.

    validate.py [--hikkoshi PATH] FILE...

Each FILE is a RegisterTaskDefinition request (the JSON `aws ecs register-task-definition --cli-input-json`
takes). Three kinds of checks:

1. The ECS API's own model, from botocore (`pip install botocore`; put it on PYTHONPATH): unknown keys, wrong
   types, missing required members, values out of the model's ranges (ParamValidator), and enum values, which
   ParamValidator leaves alone.
2. What the ECS API refuses or Fargate cannot run although the model allows it, as the model's documentation
   states it: the health check's ranges, Fargate's stopTimeout limit and CPU/memory pairs, awsvpc, an
   execution role wherever ECS pulls secrets or writes awslogs.
3. What hikkoshi needs: every command (the container's, and a `CMD hikkoshi ...` health check) parses as a
   hikkoshi command line, run by the hikkoshi binary with HIKKOSHI_PARSE_ONLY=1 and the container's
   environment (secrets as placeholders); each --hook parses as sh; a --role-password env:VAR names a secret;
   no secret sits in `environment` or on the command line; logs go to awslogs as JSON lines; the user is not
   root; the health check asks the port that --listen serves.

Exit status: 0 when every file passes; 1 naming each file and each error; 2 on a usage error.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from urllib.parse import urlparse

try:
    import botocore.session
    import botocore.validate
except ImportError:
    sys.exit(
        "validate.py: botocore is not importable: `python3 -m pip install --target DIR botocore` and run with "
        "PYTHONPATH=DIR (.ci/prepare installs it in /opt/hikkoshi/py)"
    )

# Variables that hold a secret whatever their value: connection strings carry passwords.
SECRET_NAMES = {"HIKKOSHI_SOURCE", "HIKKOSHI_TARGET", "HIKKOSHI_PGBOUNCER", "PGPASSWORD", "PGPASSFILE"}
SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)
# A password in a URL (scheme://user:password@host) or in a key=value connection string.
PASSWORD_IN_TEXT = re.compile(r"://[^/\s@:]+:[^/\s@]+@|\bpassword\s*=", re.IGNORECASE)

# From the model's documentation of HealthCheck's members ("You may specify between 5 and 300 seconds").
HEALTH_RANGES = {"interval": (5, 300), "timeout": (2, 60), "retries": (1, 10), "startPeriod": (0, 300)}
# From the model's documentation of stopTimeout: "For tasks that use the Fargate launch type, the max stop
# timeout value is 120 seconds".
FARGATE_MAX_STOP_TIMEOUT = 120


def fargate_memory(cpu):
    """The memory sizes (MiB) Fargate offers with this many CPU units, from the model's documentation of
    RegisterTaskDefinition's `memory`."""
    gb = 1024
    return {
        256: [512, 1024, 2048],
        512: [1024, 2048, 3072, 4096],
        1024: list(range(2 * gb, 8 * gb + 1, gb)),
        2048: list(range(4 * gb, 16 * gb + 1, gb)),
        4096: list(range(8 * gb, 30 * gb + 1, gb)),
        8192: list(range(16 * gb, 60 * gb + 1, 4 * gb)),
        16384: list(range(32 * gb, 120 * gb + 1, 8 * gb)),
    }.get(cpu)


def register_task_definition_shape():
    model = botocore.session.get_session().get_service_model("ecs")
    return model.operation_model("RegisterTaskDefinition").input_shape


def model_errors(params, shape):
    """botocore's ParamValidator, one error per line of its report."""
    report = botocore.validate.ParamValidator().validate(params, shape)
    if not report.has_errors():
        return []
    return ["ECS model: " + line for line in report.generate_report().splitlines() if line.strip()]


def enum_errors(value, shape, path):
    """Enum values, which ParamValidator does not check (the API refuses them)."""
    errors = []
    if shape.type_name == "structure" and isinstance(value, dict):
        for key, member in shape.members.items():
            if key in value:
                errors += enum_errors(value[key], member, f"{path}.{key}" if path else key)
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            errors += enum_errors(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            errors += enum_errors(item, shape.value, f"{path}.{key}")
    elif shape.type_name == "string" and isinstance(value, str) and shape.enum and value not in shape.enum:
        errors.append(f"ECS model: {path}: {value!r} is not one of {', '.join(shape.enum)}")
    return errors


def as_int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def task_errors(td):
    """What the API or Fargate refuses although the model's types allow it."""
    errors = []
    fargate = "FARGATE" in (td.get("requiresCompatibilities") or [])
    if not fargate:
        errors.append('requiresCompatibilities: hikkoshi\'s tasks are written for ["FARGATE"]')
    if fargate and td.get("networkMode") != "awsvpc":
        errors.append(f"networkMode: Fargate needs \"awsvpc\", not {td.get('networkMode')!r}")
    platform = td.get("runtimePlatform") or {}
    if platform.get("operatingSystemFamily") != "LINUX" or platform.get("cpuArchitecture") != "X86_64":
        errors.append(
            "runtimePlatform: the image is built for linux/amd64: operatingSystemFamily LINUX, "
            "cpuArchitecture X86_64"
        )
    if fargate:
        cpu, memory = as_int(td.get("cpu")), as_int(td.get("memory"))
        sizes = fargate_memory(cpu)
        if sizes is None:
            errors.append(f"cpu: {td.get('cpu')!r} is not a Fargate size (256, 512, 1024, 2048, 4096, 8192, 16384)")
        elif memory not in sizes:
            errors.append(f"memory: Fargate offers {sizes[0]}..{sizes[-1]} MiB with cpu {cpu}, not {td.get('memory')!r}")
    containers = td.get("containerDefinitions") or []
    needs_execution_role = any(
        c.get("secrets") or (c.get("logConfiguration") or {}).get("logDriver") == "awslogs"
        for c in containers if isinstance(c, dict)
    )
    if needs_execution_role and not td.get("executionRoleArn"):
        errors.append(
            "executionRoleArn: ECS reads `secrets` and writes awslogs with the task execution role; none is given"
        )
    for i, c in enumerate(containers):
        if not isinstance(c, dict):
            continue
        at = f"containerDefinitions[{i}]"
        stop = c.get("stopTimeout")
        if fargate and isinstance(stop, int) and stop > FARGATE_MAX_STOP_TIMEOUT:
            errors.append(f"{at}.stopTimeout: Fargate's maximum is {FARGATE_MAX_STOP_TIMEOUT} s, not {stop}")
        health = c.get("healthCheck") or {}
        for key, (low, high) in HEALTH_RANGES.items():
            v = health.get(key)
            if isinstance(v, int) and not low <= v <= high:
                errors.append(f"{at}.healthCheck.{key}: between {low} and {high}, not {v}")
        command = health.get("command")
        if isinstance(command, list) and command and command[0] not in ("CMD", "CMD-SHELL"):
            errors.append(f"{at}.healthCheck.command: starts with CMD or CMD-SHELL, not {command[0]!r}")
    return errors


def option_values(args, option):
    """The values of `--option VALUE` and `--option=VALUE` in an argument list."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg[len(option) + 1:])
    return values


def listen_port(args):
    for value in option_values(args, "--listen"):
        port = value.rsplit(":", 1)[-1]
        if port.isdigit():
            return int(port)
    return None


def container_errors(c, at):
    """hikkoshi's own rules for one container: secrets, logs, user, hooks, ports."""
    errors = []
    env = {e.get("name"): e.get("value", "") for e in c.get("environment") or [] if isinstance(e, dict)}
    secrets = {s.get("name"): s.get("valueFrom", "") for s in c.get("secrets") or [] if isinstance(s, dict)}
    for name, value in env.items():
        if not isinstance(name, str):
            continue
        if name in SECRET_NAMES or SECRET_WORDS.search(name):
            errors.append(
                f"{at}.environment: {name} is a secret: give it in `secrets` (valueFrom a Secrets Manager ARN), "
                "where ECS keeps its value out of the task definition"
            )
        elif isinstance(value, str) and PASSWORD_IN_TEXT.search(value):
            errors.append(f"{at}.environment: {name} holds a password: move it to `secrets`")
    for name, arn in secrets.items():
        if not (isinstance(arn, str) and re.match(r"arn:aws[a-z-]*:(secretsmanager|ssm):", arn)):
            errors.append(f"{at}.secrets: {name}: valueFrom is not a Secrets Manager or SSM parameter ARN: {arn!r}")
    command = c.get("command") or []
    if not isinstance(command, list):
        return errors
    for arg in command:
        if isinstance(arg, str) and PASSWORD_IN_TEXT.search(arg):
            errors.append(
                f"{at}.command: an argument holds a password (it would show in the task definition and in ps): "
                "give connection strings through the secrets HIKKOSHI_SOURCE and HIKKOSHI_TARGET"
            )
    for spec in option_values(command, "--role-password"):
        if "=env:" in spec:
            var = spec.rsplit("=env:", 1)[1]
            if var in env:
                errors.append(f"{at}: --role-password {spec}: {var} is in `environment`; it belongs in `secrets`")
            elif var not in secrets:
                errors.append(f"{at}: --role-password {spec}: no secret named {var}")
    for hook in option_values(command, "--hook"):
        sh = subprocess.run(["sh", "-n", "-c", hook], capture_output=True, text=True)
        if sh.returncode != 0:
            errors.append(f"{at}: --hook does not parse as sh: {sh.stderr.strip()}")
    if "json" not in option_values(command, "--log-format"):
        errors.append(f"{at}.command: give --log-format json, so that CloudWatch gets one JSON event a line")
    log = c.get("logConfiguration") or {}
    if log.get("logDriver") != "awslogs":
        errors.append(f"{at}.logConfiguration: logDriver is {log.get('logDriver')!r}; use awslogs (CloudWatch Logs)")
    else:
        options = log.get("options") or {}
        for key in ("awslogs-group", "awslogs-region", "awslogs-stream-prefix"):
            if not options.get(key):
                errors.append(f"{at}.logConfiguration.options: {key} is missing (Fargate needs the stream prefix)")
    user = str(c.get("user") or "")
    if user.split(":")[0] in ("", "0", "root"):
        errors.append(f"{at}.user: run as a non-root user (a UID, as the image defines it), not {user or 'unset (root)'!r}")
    port = listen_port(command)
    health = (c.get("healthCheck") or {}).get("command") or []
    if port is not None:
        mapped = [m.get("containerPort") for m in c.get("portMappings") or [] if isinstance(m, dict)]
        if port not in mapped:
            errors.append(f"{at}.portMappings: --listen serves port {port}, which no portMapping exposes")
        urls = [a for a in health if isinstance(a, str) and a.startswith("http")]
        for url in urls:
            if urlparse(url).port != port:
                errors.append(f"{at}.healthCheck: asks {url}, but --listen serves port {port}")
    return errors


def placeholder_env(c):
    """The container's environment as hikkoshi would see it, secrets replaced by placeholders."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HIKKOSHI_PARSE_ONLY": "1"}
    for e in c.get("environment") or []:
        if isinstance(e, dict) and isinstance(e.get("name"), str):
            env[e["name"]] = str(e.get("value", ""))
    for s in c.get("secrets") or []:
        if isinstance(s, dict) and isinstance(s.get("name"), str):
            env[s["name"]] = "postgresql://placeholder@placeholder.invalid:5432/placeholder"
    return env


def parse_errors(hikkoshi, args, env, what):
    run = subprocess.run([hikkoshi, *args], env=env, capture_output=True, text=True, timeout=30)
    if run.returncode == 0:
        return []
    said = [line.strip() for line in (run.stderr or run.stdout).splitlines() if line.strip()]
    return [f"{what} does not parse as a hikkoshi command line (exit {run.returncode}): " + " / ".join(said[:6])]


def parse_only_supported(hikkoshi):
    """Whether this hikkoshi has the parse-only mode: with it, a status command against a closed port exits 0
    without connecting; without it, it fails to connect."""
    try:
        run = subprocess.run(
            [hikkoshi, "status", "--target", "postgresql://validate@127.0.0.1:1/none"],
            env={"PATH": os.environ.get("PATH", ""), "HIKKOSHI_PARSE_ONLY": "1"},
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {hikkoshi}: {e}"
    if run.returncode != 0:
        return (
            f"{hikkoshi} has no parse-only mode (HIKKOSHI_PARSE_ONLY=1 hikkoshi status ... tried to connect and "
            f"exited {run.returncode}): commands cannot be checked"
        )
    return None


def command_errors(c, at, hikkoshi):
    """The container's command and a `CMD hikkoshi ...` health check, parsed by hikkoshi itself."""
    errors = []
    env = placeholder_env(c)
    entry = c.get("entryPoint")
    command = c.get("command")
    if entry and os.path.basename(entry[-1]) != "hikkoshi":
        errors.append(f"{at}.entryPoint: {entry!r} is not hikkoshi; leave the image's entrypoint (hikkoshi)")
    elif isinstance(command, list) and all(isinstance(a, str) for a in command):
        errors += parse_errors(hikkoshi, command, env, f"{at}.command")
    health = (c.get("healthCheck") or {}).get("command") or []
    if len(health) >= 2 and health[0] == "CMD" and os.path.basename(str(health[1])) == "hikkoshi":
        errors += parse_errors(hikkoshi, [str(a) for a in health[2:]], env, f"{at}.healthCheck.command")
    return errors


def validate(path, shape, hikkoshi, no_parse_only):
    try:
        with open(path) as f:
            td = json.load(f)
    except OSError as e:
        return [f"cannot read it: {e}"]
    except json.JSONDecodeError as e:
        return [f"not JSON: {e}"]
    if not isinstance(td, dict):
        return ["not a JSON object (a RegisterTaskDefinition request)"]
    errors = model_errors(td, shape) + enum_errors(td, shape, "") + task_errors(td)
    for i, c in enumerate(td.get("containerDefinitions") or []):
        if not isinstance(c, dict):
            continue
        at = f"containerDefinitions[{i}]"
        errors += container_errors(c, at)
        errors += [no_parse_only] if no_parse_only else command_errors(c, at, hikkoshi)
    return errors


def main():
    parser = argparse.ArgumentParser(description="Check ECS task definitions for hikkoshi offline.")
    parser.add_argument(
        "--hikkoshi",
        default=os.environ.get("HIKKOSHI_BIN") or shutil.which("hikkoshi"),
        help="the hikkoshi binary that parses the commands (default: $HIKKOSHI_BIN, then PATH)",
    )
    parser.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args()
    if not args.hikkoshi:
        parser.exit(2, "validate.py: no hikkoshi binary: give --hikkoshi PATH or HIKKOSHI_BIN\n")
    shape = register_task_definition_shape()
    no_parse_only = parse_only_supported(args.hikkoshi)
    failed = 0
    for path in args.files:
        errors = validate(path, shape, args.hikkoshi, no_parse_only)
        if errors:
            failed += 1
            for e in errors:
                print(f"{path}: {e}")
        else:
            print(f"{path}: ok")
    if failed:
        print(f"{failed} of {len(args.files)} file(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
