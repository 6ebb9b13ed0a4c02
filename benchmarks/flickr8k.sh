#!/usr/bin/env bash
# Real photos: Flickr8k train -> dev with ImageNet features, MobileNet (alpha 0.75) or EfficientNet-Lite0.
# Needs ../shared/data/flickr8k (Images/, captions.txt, Flickr_8k.{train,dev}Images.txt) and
# ../shared/weights/ (mobilenet_7_5_224_tf_no_top.h5, efficientnet_lite0_224.keras). Usage:
#   bash benchmarks/flickr8k.sh [VARIANT] [ENCODER] [-S key=value ...]   (ENCODER: mobilenet | lite0)
# Runs as DVC experiments (named flickr8k-VARIANT-ENCODER, or $EXP_NAME), so the default
# workspace results stay as they are; `dvc exp show` compares them afterwards. Every variant
# shares the features (DVC's run cache restores them; another `-S seed=` computes them again,
# as the features stage reads the seed for random-init encoders) and the training budget
# (5 epochs, early stopping with patience 2, Adam 1e-3, batch 128).
#   bash benchmarks/flickr8k.sh                  # GRU + soft attention (the headline run)
#   bash benchmarks/flickr8k.sh noatt            # GRU, no attention ("image as initial state")
#   bash benchmarks/flickr8k.sh blind            # GRU, image features zeroed (attention over
#                                                # all-zero features carries nothing: off)
#   bash benchmarks/flickr8k.sh lstm             # LSTM + soft attention (Show, Attend and Tell)
#   bash benchmarks/flickr8k.sh lstm-noatt       # LSTM, no attention (Show and Tell)
#   bash benchmarks/flickr8k.sh updown           # top-down attention LSTM + language LSTM (Up-Down)
#   bash benchmarks/flickr8k.sh transformer      # 2-layer Transformer decoder, 4 heads
#   bash benchmarks/flickr8k.sh scst             # the headline run, then SCST for CIDEr-D (finetune defaults)
set -euo pipefail
variant=${1:-attention}
encoder=${2:-mobilenet}
shift $(( $# < 2 ? $# : 2 ))
case "$encoder" in
  mobilenet) features=(-S features.backbone=mobilenet -S features.alpha=0.75 -S features.layer=conv_pw_13_relu
                       -S features.weights=../shared/weights/mobilenet_7_5_224_tf_no_top.h5) ;;
  lite0) features=(-S features.backbone=../shared/weights/efficientnet_lite0_224.keras -S features.alpha=1.0
                   -S features.layer= -S features.weights=none) ;;
  *) echo "unknown encoder $encoder (mobilenet | lite0)" >&2; exit 2 ;;
esac
extra=()
case "$variant" in
  attention) ;;
  noatt) extra=(-S train.attention=false) ;;
  blind) extra=(-S train.blind=true -S train.attention=false) ;;
  lstm) extra=(-S train.decoder=lstm) ;;
  lstm-noatt) extra=(-S train.decoder=lstm -S train.attention=false) ;;
  updown) extra=(-S train.decoder=updown) ;;
  transformer) extra=(-S train.decoder=transformer -S train.units=1024 -S train.num_layers=2 -S train.num_heads=4) ;;
  scst) extra=(-S finetune.enabled=true) ;;
  *) echo "unknown variant $variant (attention | noatt | blind | lstm | lstm-noatt | updown | transformer | scst)" >&2; exit 2 ;;
esac
dvc exp run -n "${EXP_NAME:-flickr8k-$variant-$encoder}" \
  -S dataset.captions=../shared/data/flickr8k/captions.txt \
  -S dataset.images=../shared/data/flickr8k/Images \
  -S dataset.splits=../shared/data/flickr8k \
  -S dataset.format=flickr_csv \
  "${features[@]}" -S features.image_size=224 -S features.batch_size=64 \
  -S vocab.min_count=5 -S vocab.max_length=20 \
  -S train.decoder=gru -S train.attention=true \
  -S train.embed_dim=256 -S train.units=512 -S train.attention_units=256 -S train.dropout=0.3 \
  -S train.batch_size=128 -S train.learning_rate=0.001 -S train.lr_decay=1.0 -S train.attention_reg=0.01 \
  -S train.epochs=5 -S train.patience=2 \
  -S evaluate.split=val -S evaluate.beam_size=5 \
  "${extra[@]}" "$@"
