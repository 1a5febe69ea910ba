# upernet_mcbeit_base_12_512_slide_160k_ade20k_pt: the recipe of lixiaotong97/mc-BEiT semantic_segmentation/configs/mcbeit/upernet/upernet_mcbeit_base_12_512_slide_160k_ade20k_pt.py
# (mmseg 0.11), as mcbeit's preset of the same name: `mcbeit-seg presets` lists what it sets.
# Values set here override the preset as --options would (mmseg keys, see mcbeit.config.segmentation.OPTION_KEYS),
# e.g. options = {"data_root": "/data/ADEChallengeData2016", "model.pretrained": "/ckpt/checkpoint-799.pth"};
# flags and --options on the command line override both.
preset = "upernet_mcbeit_base_12_512_slide_160k_ade20k_pt"
options = {}
