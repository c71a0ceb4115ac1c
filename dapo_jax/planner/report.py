"""A memory plan as text: one plan's report (GiB per chip) and the summary table of several."""
from collections.abc import Sequence

from dapo_jax.planner.programs import GIB, Plan


_PER_CHIP_LABELS = {"sampler_params": "interim sampler params (the decode weights' source, several hosts only)"}


def gib(value: int | None) -> str:
  """Bytes as GiB with two decimals ("?" for unknown)."""
  return "?" if value is None else f"{value / GIB:.2f}"


def format_plan(p: Plan) -> str:
  """A human-readable report of one plan (GiB per chip)."""
  mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
  mb, ro = p.micro_batch, p.rollout
  sharded = f"{mb['rows_per_device']} per device"
  if mb["padding_rows"]:
    sharded += f", {mb['padding_rows']} of them padding (the token budget gives fewer rows than data x fsdp)"
  share = "a mini-batch" if p.num_processes == 1 else f"each of the {p.num_processes} hosts' share of a mini-batch"
  count = mb["micro_batches_per_update"]
  made = (f"  {share} ({mb['mini_batch_rows_per_host']} rows) is split by actor.micro_batch_tokens into "
          f"{count} micro-batch{'es' if count > 1 else ''} of up to {mb['rows_per_host']} "
          f"row{'s' if mb['rows_per_host'] > 1 else ''}; the old-log-prob pass's micro-batch "
          f"(rollout.log_prob_micro_batch_tokens) has {mb['log_prob_rows']} rows")
  where = ""
  if p.num_processes > 1:
    sampler_mesh = " ".join(f"{k}={v}" for k, v in p.sampler_mesh.items())
    where = f" per host (each of the {p.num_processes} hosts samples on its own chips: mesh {sampler_mesh})"
  lines = [
      f"{p.topology}: {p.num_devices} x {p.device_kind}, {gib(p.hbm_bytes)} GiB HBM each ({p.hbm_source}); "
      f"mesh {mesh}; model {p.model} ({p.num_params / 1e9:.2f}B params)",
      f"  mesh layout: {p.mesh_layout}",
      f"  micro-batch: {mb['rows']} packed rows x {mb['width']} tokens, {sharded};",
      made,
      f"  rollout: {ro['decode_rows_per_host']} decode slots{where}, "
      f"{ro['steps_per_call']} decode step{'s' if ro['steps_per_call'] > 1 else ''} per call; "
      f"prefill {ro['prefill_rows']} x {ro['prefill_width']}; its copy of the weights (the decode weights) "
      f"{gib(ro['weight_bytes_per_chip'])} GiB per chip",
      f"  KV pool: {ro['pages']} pages of {ro['page_size']} entries, {gib(ro['pool_bytes_per_chip'])} GiB per chip "
      f"({_sized_by(ro)}); a full-length response ({ro['cache_length']} entries) takes {ro['pages_per_slot']}",
      f"  concurrent sequences per host: {ro['concurrent_sequences_per_host']} of max_prompt_length + "
      f"{ro['counted_response_length']} tokens (no more than the decode slots, nor than the pool holds with a "
      "group's full prompt pages shared)",
      "  per chip (GiB): " + ", ".join(f"{_PER_CHIP_LABELS.get(k, k.replace('_', ' '))} {gib(v)}"
                                       for k, v in p.per_chip.items()),
      f"  {'program':<22} {'args':>8} {'out':>8} {'temp':>8} {'alias':>8} {'peak':>8} {'compile s':>10} "
      f"{'TFLOP/call':>11}",
  ]
  for r in p.programs:
    if r.fits:
      lines.append(f"  {r.name:<22} {gib(r.argument_bytes):>8} {gib(r.output_bytes):>8} {gib(r.temp_bytes):>8} "
                   f"{gib(r.alias_bytes):>8} {gib(r.peak_bytes):>8} {r.compile_seconds:>10.1f} "
                   f"{r.flops / 1e12:>11.1f}")
    else:
      lines.append(f"  {r.name:<22} does not fit: needs {gib(r.required_bytes)} of {gib(r.available_bytes)} "
                   f"GiB ({r.compile_seconds:.1f} s)")
  lines.append(f"  {'phase':<24} {'resident':>9} {'peak':>8}  fits")
  for ph in p.phases:
    resident = None if None in ph.resident.values() else sum(ph.resident.values())
    lines.append(f"  {ph.name:<24} {gib(resident):>9} {gib(ph.peak_bytes):>8}  "
                 f"{'yes' if ph.fits else 'NO'}")
  if not p.rows_split_between_hosts:
    lines.append(f"  !! batch_placement.put_micro_batches refuses this mesh on {p.num_processes} hosts: blocks of "
                 "batch rows span several hosts (lay the non-batch mesh axes, e.g. tensor, within a host)")
  if ro.get("pool_error"):
    lines.append(f"  !! the training program refuses the KV pool: {ro['pool_error']}")
  if p.config_error:
    lines.append(f"  !! the training program refuses the config on {p.num_processes} hosts: {p.config_error}")
  verdict = "fits in HBM" if p.fits else "DOES NOT FIT in HBM"
  lines.append(f"  => {verdict}: peak {gib(p.peak_bytes)} of {gib(p.hbm_bytes)} GiB per chip ({p.peak_phase}); "
               f"planned in {p.plan_seconds:.0f} s")
  return "\n".join(lines)


def _sized_by(ro) -> str:
  if ro["sized_by"] == "rollout.num_pages":
    return "rollout.num_pages"
  return (f"gpu_memory_utilization {ro['memory_utilization']:g} of the {gib(ro['free_bytes_per_chip_at_sizing'])} "
          "GiB per chip free beside the trainer's params and optimizer state and the decode weights")


def format_summary(plans: Sequence[Plan]) -> str:
  """One line per plan: the table of the README."""
  lines = ["| topology | chips (hosts) | mesh (data, fsdp, tensor) | micro-batch rows x tokens (per device) | "
           "decode slots per host (steps per call) | KV pool GiB per chip (pages x entries) | "
           "concurrent sequences per host (response length) | peak GiB (phase) | HBM GiB | fits | rows placeable |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for p in plans:
    mb, ro = p.micro_batch, p.rollout
    mesh = ", ".join(str(v) for v in p.mesh.values())
    lines.append(f"| {p.topology} | {p.num_devices} ({p.num_processes}) | {mesh} | "
                 f"{mb['rows']} x {mb['tokens'] // mb['rows']} ({mb['rows_per_device']}) | "
                 f"{ro['decode_rows_per_host']} ({ro['steps_per_call']}) | "
                 f"{gib(ro['pool_bytes_per_chip'])} ({ro['pages']} x {ro['page_size']}) | "
                 f"{ro['concurrent_sequences_per_host']} ({ro['counted_response_length']}) | "
                 f"{gib(p.peak_bytes)} ({p.peak_phase}) | {gib(p.hbm_bytes)} | {'yes' if p.fits else 'no'} | "
                 f"{'yes' if p.rows_split_between_hosts else 'no'} |")
  return "\n".join(lines)
