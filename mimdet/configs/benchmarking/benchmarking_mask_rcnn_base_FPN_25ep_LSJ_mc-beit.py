# The seed's detectron2 LazyConfig of this name, as a preset of mcbeit-det: its model, optimizer, schedule and data
# values are mcbeit.config.detection.PRESETS["benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit"] on top of the flags' defaults
# (mcbeit-det presets prints them). The LazyConfig keys below override them, as trailing KEY=VALUE arguments do.
preset = "benchmarking_mask_rcnn_base_FPN_25ep_LSJ_mc-beit"
overrides = {
    # as the seed's file: a path relative to the folder the command runs in (mimdet/)
    "model.backbone.bottom_up.pretrained": "mcbeit_pretrained/checkpoint-799.pth",
    "train.output_dir": "work_dirs/mask_rcnn_base_FPN_25ep_LSJ_mc-beit",
}
