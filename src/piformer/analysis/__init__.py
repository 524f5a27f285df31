"""Attention-entropy analysis: measure, band, diagnose, compare and plot (paper Section 3).

    from piformer.analysis import analyse_paths, make_all_figures, format_comparison
    results = analyse_paths(["runs/a", "runs/b"], data_dir="data/builtin", batches=8)
    print(format_comparison(results))
    figs = make_all_figures(results, "figs/")        # {"heatmap": Path("figs/entropy_heatmap.png"), ...}
    results[0].to_dict()                             # JSON-ready

Modules: `result` (EntropyResult, analyse_entropy), `measure` (validation batches, Eq. 7 on a model),
`runs` (run directories, metrics.jsonl), `hf` (HF transformers models), `tables`, `figures`.
"""

from .figures import (
    FIGURES,
    FigureSet,
    FigureUnavailable,
    make_all_figures,
    plot_band_fractions,
    plot_entropy_dynamics,
    plot_head_entropy_heatmaps,
    plot_layer_entropy,
    plot_temperatures,
    plot_thresholds,
)
from .hf import hf_entropy_fn, is_hf_model_dir, load_hf_causal_lm
from .measure import entropy_from_attentions, measure_head_entropy, val_batches
from .result import REFERENCES, EntropyHistory, EntropyResult, analyse_entropy, temperature_stats
from .runs import (
    RESULT_FILE,
    RunInfo,
    analyse_hf,
    analyse_paths,
    analyse_run,
    analyze_hf,
    analyze_paths,
    analyze_run,
    entropy_history,
    load_or_analyse,
    load_result,
    load_results,
    open_run,
    read_metrics,
    save_result,
)
from .tables import format_comparison, format_result

__all__ = [
    "EntropyResult", "EntropyHistory", "REFERENCES", "analyse_entropy", "temperature_stats",
    "val_batches", "measure_head_entropy", "entropy_from_attentions",
    "RunInfo", "open_run", "read_metrics", "entropy_history", "analyse_run", "analyse_hf", "analyse_paths",
    "analyze_run", "analyze_hf", "analyze_paths", "RESULT_FILE", "save_result", "load_result", "load_results", "load_or_analyse",
    "is_hf_model_dir", "load_hf_causal_lm", "hf_entropy_fn",
    "format_result", "format_comparison",
    "FIGURES", "FigureSet", "FigureUnavailable", "make_all_figures",
    "plot_head_entropy_heatmaps", "plot_band_fractions", "plot_layer_entropy", "plot_entropy_dynamics",
    "plot_thresholds", "plot_temperatures",
]
