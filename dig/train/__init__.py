"""DiG training: typed config (config), DeepSpeed engine (engine), ZeRO-3 EMA (ema), run-directory checkpoints
(checkpoint), MLflow tracking (tracking), the loop (trainer), export of consolidated weights (export).

    dig train --config configs/train/<run>.yaml key=value …     # resumes from <run.dir>/checkpoints/latest
    dig export <run dir or checkpoint> --out <folder>            # model.safetensors + config.json
    model, info = dig.inference.load_exported(<folder>)          # create_model(info["model"], **info["model_kwargs"])
"""
