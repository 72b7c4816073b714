"""Every public function and class comes with a docstring example (tests/test_docstrings.py runs them).

The names below still lack one. The list may only shrink: a new public name without an example fails,
and so does a listed name that has gained one (delete it from the list). Print the current list with
``python tests/test_docstring_coverage.py``; ``--write`` puts it in this file (after a merge).
"""

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import lens_laai

LISTED = """
lens_laai.baselines.common.check_shots
lens_laai.baselines.common.count_forward
lens_laai.baselines.common.runner_for
lens_laai.baselines.common.unit_meter
lens_laai.baselines.function_vectors.FunctionVectorResult
lens_laai.baselines.function_vectors.candidate_layers
lens_laai.baselines.function_vectors.causal_indirect_effect
lens_laai.baselines.function_vectors.deranged_prompts
lens_laai.baselines.function_vectors.fit_function_vector
lens_laai.baselines.function_vectors.function_vector
lens_laai.baselines.function_vectors.head_outputs
lens_laai.baselines.function_vectors.indirect_effects
lens_laai.baselines.function_vectors.mean_head_activations
lens_laai.baselines.function_vectors.shuffled_label_batch
lens_laai.baselines.function_vectors.target_probs
lens_laai.baselines.function_vectors.top_heads
lens_laai.baselines.mean_difference.MeanDifferenceResult
lens_laai.baselines.mean_difference.fit_mean_difference
lens_laai.baselines.mean_difference.head_scores
lens_laai.baselines.mean_difference.top_k_mask
lens_laai.baselines.prompting.prompting_cost
lens_laai.fastpath.blocks.BlockCall
lens_laai.fastpath.blocks.BlockReplayModel
lens_laai.fastpath.blocks.ReplayUnsupported
lens_laai.fastpath.blocks.device_of
lens_laai.fastpath.blocks.final_softcap
lens_laai.fastpath.blocks.is_cache
lens_laai.fastpath.blocks.record_block_calls
lens_laai.fastpath.blocks.recording_problems
lens_laai.fastpath.blocks.replay_logits
lens_laai.fastpath.blocks.soft_cap
lens_laai.fastpath.kernels.BlockInputs
lens_laai.fastpath.kernels.KernelUnsupported
lens_laai.fastpath.kernels.LlamaLastToken
lens_laai.fastpath.kernels.last_token_cross_entropy
lens_laai.fastpath.kernels.rms_norm
lens_laai.fastpath.kernels.rotary_tables
lens_laai.fastpath.kernels.unembed
lens_laai.fastpath.kernels.unwrap
lens_laai.fastpath.notices.warn_once
lens_laai.fastpath.prefix.FrozenPrefix
lens_laai.fastpath.prefix.LastTokenCache
lens_laai.fastpath.prefix.prefix_kv
lens_laai.fastpath.prefix.tolerance
lens_laai.fastpath.runner.LayerRunner
lens_laai.fastpath.runner.block_device
lens_laai.fastpath.runner.cached_runner
lens_laai.fastpath.scoring.Scores
lens_laai.fitting.layer_fit.LayerFit
lens_laai.fitting.layer_fit.initial_delta
lens_laai.fitting.layer_fit.lambda_max
lens_laai.fitting.layer_fit.layer_path
lens_laai.fitting.layer_fit.objective
lens_laai.fitting.layer_fit.solve_layer
lens_laai.fitting.layer_fit.training_batches
lens_laai.models.bridge.last_position_hooks
lens_laai.models.head_write.attention_write
lens_laai.models.head_write.head_writes
lens_laai.models.head_write.is_linear_write
lens_laai.models.head_write.post_attention_norm
lens_laai.models.head_write.write_of_delta
lens_laai.models.loading.check_placement
lens_laai.models.loading.find_embedded_gguf
lens_laai.models.tiny.boot_in_memory
lens_laai.models.tiny.tiny_hf_model_for
lens_laai.models.tiny.tiny_tokenizer
lens_laai.storage.bundle.atomic_write_bytes
lens_laai.storage.bundle.check_save_path
lens_laai.storage.bundle.load_bundle
lens_laai.storage.bundle.save_bundle
lens_laai.storage.lock.save_lock
lens_laai.storage.safe_read.json_depth
lens_laai.storage.safe_read.loads_json
lens_laai.storage.safe_read.read_regular_file
lens_laai.storage.schema.AblationManifest
lens_laai.storage.schema.DataRecordJSON
lens_laai.storage.schema.Fingerprint
lens_laai.storage.schema.HeadManifest
lens_laai.storage.schema.ManifestBase
lens_laai.storage.schema.Metadata
lens_laai.storage.schema.OpinionPromptJSON
lens_laai.storage.schema.ResidualManifest
lens_laai.storage.schema.SurveyRecordJSON
lens_laai.storage.schema.TemplateJSON
lens_laai.storage.schema.describe
lens_laai.storage.schema.manifest_json_schema
lens_laai.storage.schema.validate_manifest
lens_laai.studies.cells.CellContext
lens_laai.studies.cells.analyse_cell
lens_laai.studies.cells.baseline_cell
lens_laai.studies.cells.check_settings
lens_laai.studies.cells.evaluate_cell
lens_laai.studies.cells.fit_cell
lens_laai.studies.cells.opinion_cell
lens_laai.studies.cells.resolve_kind
lens_laai.studies.runner.CellRunner
lens_laai.studies.runner.pending
lens_laai.studies.runner.run_study
lens_laai.studies.spec.Cell
lens_laai.studies.spec.Study
lens_laai.studies.spec.StudyError
lens_laai.studies.spec.canonical_json
lens_laai.studies.spec.config_hash
lens_laai.studies.spec.load_study
lens_laai.studies.store.ResultStore
lens_laai.studies.store.make_row
lens_laai.studies.store.read_results
"""
WITHOUT_EXAMPLE = set(LISTED.split())


def names_without_example() -> set[str]:
    """Public module-level functions and classes of lens_laai, defined where found, with no ``>>>`` in their docstring."""
    missing = set()
    for info in pkgutil.walk_packages(lens_laai.__path__, "lens_laai."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and ">>>" not in (inspect.getdoc(obj) or ""):
                missing.add(f"{info.name}.{name}")
    return missing


def test_new_public_names_come_with_an_example():
    new = sorted(names_without_example() - WITHOUT_EXAMPLE)
    assert not new, f"public names without a docstring example (add an 'Example:' section with >>> lines): {new}"


def test_the_allow_list_only_shrinks():
    stale = sorted(WITHOUT_EXAMPLE - names_without_example())
    assert not stale, f"these names have an example now or are gone; delete them from LISTED: {stale}"


if __name__ == "__main__":
    missing = sorted(names_without_example())
    print(len(missing), "public module-level functions and classes without an example:")
    print("\n".join(missing))
    if "--write" in sys.argv[1:]:
        here = Path(__file__)
        listed = "".join(f"{name}\n" for name in missing)
        text = re.sub(
            r'(LISTED = """\n).*?(""")', lambda m: m[1] + listed + m[2], here.read_text(), count=1, flags=re.S
        )
        here.write_text(text)
