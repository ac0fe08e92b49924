# Full fine-tuning twin of delta_deeplabv3_r50-d8_ade20k-to-cityscapes.py: mmseg's own
# Cityscapes DeepLabV3 R-50-D8 config (19-class heads, 40k iterations, SGD lr 0.01),
# started from the same ADE20K checkpoint instead of ImageNet. Plain upstream behaviour:
# every parameter trains; the heads' `conv_seg` do not match the 150-class checkpoint and
# start fresh (mmengine loads with strict=False and warns about the size mismatch).
_base_ = "mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py"

# deeplabv3_r50-d8_4xb4-160k_ade20k-512x512 (mIoU 42.66), from
# mmseg/.mim/configs/deeplabv3/metafile.yaml
load_from = "https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3/deeplabv3_r50-d8_512x512_160k_ade20k/deeplabv3_r50-d8_512x512_160k_ade20k_20200615_123227-5d0ee427.pth"

# load_from replaces every backbone weight: no ImageNet download first (upstream's config
# would fetch open-mmlab://resnet50_v1c only to overwrite it, and fails offline)
model = dict(pretrained=None)
