"""Light fusion heads trained from a feature cache in seconds (stage 1 of the project).

    from heads.train import TrainConfig, train        # train(cfg, cache_path_or_CacheData, out_dir)
    from heads.predict import predict                 # predict(run_dir, cache, out, split="test")
    from heads.fusions import list_fusions, create_fusion, HeadConfig, DEFAULT_FUSION
    from heads.data import load_cache, split_labelled

Heads never import transformers or open_clip: everything they see comes from the HDF5 cache.
"""
__version__ = "0.1.0"
