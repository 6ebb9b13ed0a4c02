#!/usr/bin/env bash
# Real photos: Flickr8k train -> dev with ImageNet MobileNet (alpha 0.75) features.
# Needs ../shared/data/flickr8k (Images/, captions.txt, Flickr_8k.{train,dev}Images.txt) and
# ../shared/weights/mobilenet_7_5_224_tf_no_top.h5. Runs as DVC experiments, so the default
# workspace results stay as they are; `dvc exp show` compares them afterwards.
#   bash benchmarks/flickr8k.sh            # soft attention (the headline run)
#   bash benchmarks/flickr8k.sh noatt      # same, no attention ("image as initial state")
#   bash benchmarks/flickr8k.sh blind      # same decoder, image features zeroed (attention over
#                                          # all-zero features carries nothing, so it runs without it)
set -euo pipefail
variant=${1:-attention}
extra=()
case "$variant" in
  attention) ;;
  noatt) extra=(-S train.attention=false) ;;
  blind) extra=(-S train.blind=true -S train.attention=false) ;;
  *) echo "unknown variant $variant (attention | noatt | blind)" >&2; exit 2 ;;
esac
dvc exp run -n "flickr8k-$variant" \
  -S dataset.captions=../shared/data/flickr8k/captions.txt \
  -S dataset.images=../shared/data/flickr8k/Images \
  -S dataset.splits=../shared/data/flickr8k \
  -S dataset.format=flickr_csv \
  -S features.backbone=mobilenet -S features.alpha=0.75 -S features.layer=conv_pw_13_relu \
  -S features.weights=../shared/weights/mobilenet_7_5_224_tf_no_top.h5 \
  -S features.image_size=224 -S features.batch_size=64 \
  -S vocab.min_count=5 -S vocab.max_length=20 \
  -S train.embed_dim=256 -S train.units=512 -S train.attention_units=256 -S train.dropout=0.3 \
  -S train.batch_size=128 -S train.learning_rate=0.001 -S train.lr_decay=1.0 -S train.attention_reg=0.01 \
  -S train.epochs=5 -S train.patience=2 \
  -S evaluate.split=val -S evaluate.beam_size=5 \
  "${extra[@]}"
