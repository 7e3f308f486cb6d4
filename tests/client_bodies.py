"""Request bodies exactly as real clients send them (spec §1.10, §2.1), shared by the adapter
and the live-server tests."""

# SillyTavern, Text Completion → KoboldCpp: the body it POSTs to /v1/completions (spec §2.1)
ST_KOBOLDCPP = {
    "prompt": "Hello", "model": None, "max_new_tokens": 200, "max_tokens": 32, "logprobs": None,
    "temperature": 0.9, "top_p": 0.9, "typical_p": 0.95, "typical": 0.95, "sampler_seed": 1234, "seed": 1234,
    "min_p": 0.05, "repetition_penalty": 1.1, "rep_pen": 1.1, "repeat_penalty": 1.1, "frequency_penalty": 0.1,
    "presence_penalty": 0.2, "top_k": 50, "top_a": 0.1, "tfs": 0.97, "tfs_z": 0.97, "skew": 0, "min_tokens": 0,
    "add_bos_token": True, "dynatemp_range": 0.2, "dynatemp_exponent": 1.5, "smoothing_factor": 0.3,
    "smoothing_curve": 1.2, "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
    "dry_penalty_last_n": 0, "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]', "xtc_threshold": 0.1,
    "xtc_probability": 0.5, "stop": ["\nUser:", "\n###"], "stopping_strings": ["\nUser:", "\n###"],
    "truncation_length": 4096, "num_ctx": 4096, "n_predict": 200, "num_predict": 200, "ban_eos_token": False,
    "ignore_eos": False, "skip_special_tokens": True, "mirostat_mode": 0, "mirostat": 0, "mirostat_tau": 5,
    "mirostat_eta": 0.1, "custom_token_bans": "5, 7", "banned_strings": ["slop phrase"], "grammar": "",
    "grammar_string": "", "sampler_order": [6, 0, 1, 3, 4, 2, 5], "rep_pen_range": 360, "repeat_last_n": 360,
    "repetition_penalty_range": 360, "rep_pen_slope": 0.7, "guidance_scale": 1, "negative_prompt": "",
    "n_probs": 0, "max_tokens_second": 0, "stream": True, "trim_stop": True, "nsigma": 0,
    "api_type": "koboldcpp", "api_server": "http://127.0.0.1:5001",
}

# KoboldAI Lite's /api/v1/generate body
LITE = {
    "n": 1, "max_context_length": 2048, "max_length": 100, "rep_pen": 1.07, "temperature": 0.7, "top_p": 0.92,
    "top_k": 100, "top_a": 0, "typical": 1, "tfs": 1, "rep_pen_range": 360, "rep_pen_slope": 0.7,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5], "memory": "[Persona]", "trim_stop": True, "genkey": "KCPP4321",
    "min_p": 0, "dynatemp_range": 0, "dynatemp_exponent": 1, "smoothing_factor": 0, "banned_tokens": [],
    "render_special": False, "logprobs": False, "presence_penalty": 0, "logit_bias": {}, "prompt": "Once",
    "quiet": True, "stop_sequence": ["You:", "\nYou "], "use_default_badwordsids": False, "bypass_eos": False,
}
