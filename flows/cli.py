"""The `botaclip` command line: demo, run, export, validate, server, deploy, serve."""

from __future__ import annotations

import os

# before Prefect is imported: no analytics, and our library's logs in the Prefect UI
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "botaclip_core")
# the temporary API server started when no PREFECT_API_URL is set needs more than 20 s on a busy laptop
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from botaclip_core.errors import BotaclipError  # noqa: E402

# botaclip_core logs progress at INFO; Prefect forwards it to the UI through the extra-loggers setting
logging.getLogger("botaclip_core").setLevel(logging.INFO)

app = typer.Typer(
    help="BotaCLIP: botany-aware embeddings of orthophotos, as a Prefect pipeline.",
    no_args_is_help=True,
)
console = Console(soft_wrap=True)  # long paths whole when piped to a log
err_console = Console(stderr=True, soft_wrap=True)


def _stage_names() -> str:
    from botaclip_core.stages import registry

    return ",".join(registry.names())


_STAGE_NAMES = _stage_names()


def _print_report(report: dict[str, Any]) -> None:
    stages = Table(title=f"region {report['region']}: stages")
    for col in ("stage", "status", "seconds", "output"):
        stages.add_column(col)
    for name, s in report["stages"].items():
        stages.add_row(name, s["status"], f"{s['seconds']:.1f}", s["output"])
    console.print(stages)
    if report.get("downstream"):
        table = Table(title="downstream (spatially blocked cross-validation)")
        for col in ("task", "features", "model", "metric", "value", "n_targets"):
            table.add_column(col)
        for r in report["downstream"]:
            table.add_row(
                r["task"],
                r["features"],
                r["model"],
                r["metric"],
                f"{r['value']:.3f}",
                str(r["n_targets"]),
            )
        console.print(table)
    if report.get("embeddings"):
        previews = report.get("previews") or {}
        for name, path in report["embeddings"].items():
            shown = f" (preview {previews[name]})" if name in previews else ""
            console.print(f"[bold]{name}[/bold] embeddings: {path}{shown}")
    if report.get("report_path"):
        console.print(f"report: {report['report_path']}  ({report.get('seconds', 0):.1f} s)")


def _overrides(weights: Path | None, dask_address: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if weights is not None:
        out["model"] = {"dofa": {"weights": str(weights.resolve())}}
    if dask_address:
        out["dask"] = {"address": dask_address}
    return out


def _run(
    catalog: Path,
    region: str,
    stages: list[str] | None,
    report: Path | None,
    use_prefect: bool,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from flows.progress_bar import progress_bar

    with progress_bar(console):
        if use_prefect:
            from flows.pipeline import PipelineParams, pipeline_flow

            _quiet_user_errors()

            params = PipelineParams(
                catalog=str(catalog),
                region=region,
                stages=stages,
                report=str(report) if report else None,
                overrides=overrides or {},
            )
            return pipeline_flow(params)
        from botaclip_core.catalog import load_catalog
        from botaclip_core.pipeline import run_region

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        logging.getLogger("distributed").setLevel(logging.WARNING)
        cat = load_catalog(catalog, overrides)
        try:
            return run_region(cat, region, stages=stages, catalog_path=catalog, report_path=report)
        except OSError as exc:  # writes outside a stage (the report) on a full disk
            from botaclip_core.store import storage_error

            clear = storage_error(exc, what="the run", workdir=cat.workdir_path)
            if clear is exc:
                raise
            raise clear from None


class _NoTracebackForUserErrors(logging.Filter):
    """Drop the traceback from Prefect's log of a task or flow failing on a BotaclipError.

    Those errors are the user's input (the message says what to fix), printed once by
    :func:`_fail`; a traceback through the engine would bury it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record, without its traceback for BotaclipErrors."""
        if record.exc_info and isinstance(record.exc_info[1], BotaclipError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in (
        "prefect.task_runs",
        "prefect.flow_runs",
        "prefect.task_engine",
        "prefect.flow_engine",
    ):
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in target.filters):
            target.addFilter(_NoTracebackForUserErrors())


def _fail(exc: BotaclipError) -> None:
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code=2)


def _parse_stages(stages: str | None) -> list[str] | None:
    return _split(stages) if stages else None


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the demo data, catalog and outputs go.")
    ] = Path("botaclip-demo"),
    report: Annotated[
        Path | None, typer.Option(help="Report path (default <workdir>/reports/demo.json).")
    ] = None,
    size: Annotated[
        str, typer.Option(help="Demo size: default, or tiny (seconds, tiny model).")
    ] = "default",
    prefect: Annotated[
        bool, typer.Option(help="Orchestrate with Prefect (default) or run in-process.")
    ] = True,
    weights: Annotated[
        Path | None, typer.Option(help="DOFA checkpoint (default: random weights).")
    ] = None,
) -> None:
    """Write the built-in demo region into WORKDIR and run the whole pipeline on it."""
    from botaclip_core.demo import write_demo_region

    try:
        catalog = write_demo_region(workdir, size=size)
        console.print(f"demo catalog: {catalog}")
        _print_report(_run(catalog, "demo", None, report, prefect, _overrides(weights, None)))
    except BotaclipError as exc:
        _fail(exc)


@app.command()
def run(
    catalog: Annotated[Path, typer.Argument(help="Path of the data catalog YAML.")],
    region: Annotated[str, typer.Option(help="Region name in the catalog.")],
    stages: Annotated[
        str | None,
        typer.Option(help=f"Comma-separated stages (and what they need): {_STAGE_NAMES}."),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Report path (default <workdir>/reports/<region>.json).")
    ] = None,
    prefect: Annotated[
        bool, typer.Option(help="Orchestrate with Prefect (default) or run in-process.")
    ] = True,
    weights: Annotated[
        Path | None, typer.Option(help="DOFA checkpoint (overrides model.dofa.weights).")
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Dask scheduler, e.g. tcp://host:8786 (overrides dask.address)."),
    ] = None,
) -> None:
    """Run the pipeline (or the named stages and what they need) on a region of CATALOG."""
    try:
        _print_report(
            _run(
                catalog,
                region,
                _parse_stages(stages),
                report,
                prefect,
                _overrides(weights, dask_address),
            )
        )
    except BotaclipError as exc:
        _fail(exc)


@app.command()
def ablation(
    catalog: Annotated[Path, typer.Argument(help="Path of the data catalog YAML.")],
    region: Annotated[str, typer.Option(help="Region name in the catalog.")],
    losses: Annotated[str, typer.Option(help="Comma-separated losses.")] = "infonce,sigmoid",
    regularizers: Annotated[
        str, typer.Option(help="Comma-separated regularisers.")
    ] = "l2sp,similarity",
    modes: Annotated[str, typer.Option(help="Comma-separated training modes.")] = "adapter",
) -> None:
    """Train a grid of BotaCLIP variants (loss × regulariser × mode) and compare them."""
    from flows.ablation import AblationParams, ablation_flow

    try:
        rows = ablation_flow(
            AblationParams(
                catalog=str(catalog.resolve()),
                region=region,
                losses=_split(losses),
                regularizers=_split(regularizers),
                modes=_split(modes),
            )
        )
    except BotaclipError as exc:
        _fail(exc)
        return
    # one column per variant: the grid is narrow, the metric list long
    table = Table(
        title=f"ablation, region {region} (table: <workdir>/reports/{region}-ablation.csv)"
    )
    table.add_column("metric")
    for r in rows:
        table.add_column(r["variant"])
    for key in [k for k in rows[0] if k not in ("variant", "loss", "regularizer", "mode")]:
        table.add_row(
            key,
            *[
                f"{r.get(key):.3f}" if isinstance(r.get(key), float) else str(r.get(key, ""))
                for r in rows
            ],
        )
    console.print(table)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def validate(
    catalog: Annotated[Path, typer.Argument(help="Path of the data catalog YAML.")],
) -> None:
    """Check a catalog: keys, values, dataset references and orthophoto globs."""
    from botaclip_core.catalog import load_catalog

    try:
        cat = load_catalog(catalog)
        for name in cat.regions:
            files = cat.orthophoto_files(name)
            console.print(f"region {name}: {len(files)} orthophoto files")
        console.print("[green]catalog is valid[/green]")
    except BotaclipError as exc:
        _fail(exc)


@app.command()
def export(
    zarr_path: Annotated[
        Path, typer.Argument(help="A botaclip Zarr (image.zarr, dofa.zarr, botaclip.zarr...).")
    ],
    out: Annotated[Path, typer.Argument(help="Output Cloud-Optimized GeoTIFF.")],
    variable: Annotated[str, typer.Option(help="Variable: image, valid, embedding...")] = "image",
    bands: Annotated[
        str | None, typer.Option(help="Comma-separated band/feature indices (0-based).")
    ] = None,
    bbox: Annotated[
        str | None,
        typer.Option(help="Only this box: MINX,MINY,MAXX,MAXY (in --crs; default the store's)."),
    ] = None,
    crs: Annotated[
        str | None, typer.Option(help="CRS of --bbox, e.g. EPSG:4326 (default: the store's).")
    ] = None,
) -> None:
    """Export a georeferenced layer (or a box of it) as a Cloud-Optimized GeoTIFF (for QGIS)."""
    from botaclip_core.export import export_cog

    try:
        picked = [int(b) for b in bands.split(",")] if bands else None
        path = export_cog(zarr_path, variable, out, bands=picked, bbox=_parse_bbox(bbox), crs=crs)
        console.print(f"wrote {path}")
    except BotaclipError as exc:
        _fail(exc)


def _parse_bbox(bbox: str | None) -> tuple[float, float, float, float] | None:
    if bbox is None:
        return None
    from botaclip_core.errors import InputDataError

    try:
        minx, miny, maxx, maxy = (float(v) for v in bbox.split(","))
    except ValueError:
        raise InputDataError(
            f"--bbox: {bbox!r} is not four numbers MINX,MINY,MAXX,MAXY (e.g. 5.7,45.0,5.8,45.1)"
        ) from None
    return minx, miny, maxx, maxy


@app.command()
def sample(
    store: Annotated[Path, typer.Argument(help="An embedding map (dofa.zarr, botaclip.zarr...).")],
    points: Annotated[
        Path, typer.Argument(help="Points: CSV (with --crs), GeoPackage/GeoJSON or (Geo)Parquet.")
    ],
    out: Annotated[Path, typer.Argument(help="Output table: .parquet or .csv.")],
    crs: Annotated[str | None, typer.Option(help="CRS of CSV coordinates, e.g. EPSG:4326.")] = None,
    x: Annotated[str, typer.Option(help="CSV column of x / longitude.")] = "x",
    y: Annotated[str, typer.Option(help="CSV column of y / latitude.")] = "y",
    method: Annotated[
        str, typer.Option(help="nearest (the cell holding the point) or bilinear.")
    ] = "nearest",
) -> None:
    """Embeddings at points: the points' columns plus emb_0..emb_{D-1} and a status column."""
    from botaclip_core.query import sample_file

    try:
        result = sample_file(store, points, out, crs=crs, x=x, y=y, method=method)
        counts = result["status"].value_counts().to_dict()
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        console.print(f"wrote {out}: {len(result)} points, {summary}")
    except BotaclipError as exc:
        _fail(exc)


@app.command()
def serve(
    catalog: Annotated[Path, typer.Argument(help="Path of the data catalog YAML.")],
    region: Annotated[str, typer.Option(help="Region name in the catalog.")],
    cron: Annotated[
        str | None, typer.Option(help="Cron schedule, e.g. '0 3 1 * *' (monthly).")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Deployment name (default botaclip-<region>).")
    ] = None,
) -> None:
    """Serve a deployment of the pipeline for REGION (scheduled runs, runs from the Prefect UI)."""
    from flows.pipeline import pipeline_flow

    params = {"params": {"catalog": str(catalog.resolve()), "region": region}}
    pipeline_flow.serve(name=name or f"botaclip-{region}", parameters=params, cron=cron)


from flows.sdm_cli import sdm_benchmark  # noqa: E402

app.command("sdm-benchmark")(sdm_benchmark)


@app.command()
def server(
    port: Annotated[int, typer.Option(help="Port of the API and the UI.")] = 4200,
    host: Annotated[
        str,
        typer.Option(help="Interface to listen on; keep loopback unless inside a container."),
    ] = "127.0.0.1",
) -> None:
    """Start a Prefect server with its UI (SQLite, or PREFECT_API_DATABASE_CONNECTION_URL)."""
    from flows.server import server_spec

    spec = server_spec(host=host, port=port)
    console.print(f"Prefect UI: [bold]{spec.ui_url}[/bold]   database: {spec.database}")
    console.print(f"in other shells: export PREFECT_API_URL={spec.api_url}")
    console.file.flush()
    # the server replaces this process: signals (Ctrl-C, docker stop) reach it directly
    os.execve(spec.command[0], spec.command, spec.env)


@app.command()
def deploy(
    catalog: Annotated[Path, typer.Argument(help="Path of the data catalog YAML.")],
    region: Annotated[
        list[str] | None, typer.Option(help="Region to deploy (repeat for more); default all.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Most flow runs at once in this process.")
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Dask scheduler of every run, e.g. tcp://host:8786 (dask.address)."),
    ] = None,
) -> None:
    """Serve each region's deployments: the pipeline on its schedule, regenerate, refit."""
    from flows.deploy import region_deployments, serve_deployments

    try:
        deployments = region_deployments(catalog, region or None, dask_address=dask_address)
    except BotaclipError as exc:
        _fail(exc)
        return
    table = Table(title="deployments (Ctrl-C stops serving them)")
    for col in ("deployment", "schedule"):
        table.add_column(col)
    for d in deployments:
        cron = ", ".join(f"{s.schedule.cron} ({s.schedule.timezone})" for s in d.schedules or [])
        table.add_row(f"{d.flow_name}/{d.name}", cron or "on demand")
    console.print(table)
    first = next(d for d in deployments if d.flow_name == "botaclip-regenerate-embeddings")
    params = first.parameters["params"]
    console.print(
        "run one: prefect deployment run "
        f"'{first.flow_name}/{first.name}' --param "
        f'\'params={{"catalog": "{params["catalog"]}", "region": "{params["region"]}", '
        '"finetune_key": "<key>"}\''
    )
    serve_deployments(deployments, limit=limit)


if __name__ == "__main__":
    app()
