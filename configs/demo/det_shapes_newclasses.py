# Patching task 2 of the main job (tools/demo.py): three new object classes (new shapes) in
# the base's appearance. The patch carries its own classification/regression rows for them
# (`classes`); the base's three classes are untouched and come back when the patch is off.
_base_ = "./det_shapes_shifted.py"

data_root = "data/demo/det_newclasses/"
new_classes = ("triangle", "ring", "cross")

train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=new_classes)))
val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=dict(classes=new_classes)))
test_dataloader = val_dataloader

# Δ on the backbone, the FPN and the RPN's shared conv; the patch owns the box head's
# classifier and regressor rows (for the new classes)
delta_patch = dict(
    _delete_=True,
    name="newclasses",
    branch=dict(type="LowRankDelta", rank=8),
    targets=["backbone", "neck", "rpn_head.rpn_conv"],
    classes=new_classes,
)
