"""Settings for every script of the pipeline: literals and comments only.

Edit this file, or override one value for one run from the command line:
    python train.py --MAX_EPOCHS=5 --DEVICE=cpu
or point every script at another settings file that sets only the names it changes:
    python run_all.py --config=my_settings.py
`python train.py --help` lists every setting with its value and what it accepts; settings.py
checks every value before a script starts.
"""

# ---- data -----------------------------------------------------------------------------------
DATA_DIR = None  # folder with one sub-folder of images per class; None = built-in digits (scikit-learn)
SEEN_CLASSES = ["0", "1", "2", "3", "4", "5"]  # sub-folder names the classifier is trained on
UNSEEN_CLASSES = ["6", "7", "8", "9"]  # sub-folder names held out, only embedded and analysed
BUILTIN_DATA_DIR = "data/digits"  # where the built-in digits are exported as PNG files (git-ignored)
BAD_IMAGES = "skip"  # unreadable/truncated/empty files: "skip" (reported and left out) or "error"

# ---- images ---------------------------------------------------------------------------------
IMAGE_SIZE = 128  # pixels, square; images are resized to IMAGE_SIZE x IMAGE_SIZE
RESIZE_MODE = "stretch"  # "stretch" (as the study did) or "pad" (pad to a square first, keeps shape)
AUGMENT = False  # random flips/90-degree turns of training images; True turns off the trunk cache for training
TTA = "none"  # test-time augmentation: "none", "flips" (mirrored each way and both: 4 orientations) or "dihedral" (all 8 turns and mirrors); evaluate, embed, open set, calibration and predict average each image's logits and embeddings over them

# ---- split ----------------------------------------------------------------------------------
TRAIN_FRACTION = 0.75  # of each seen class; the split is drawn once and kept in outputs/split.csv
VAL_FRACTION = 0.05  # of each seen class
TEST_FRACTION = 0.20  # of each seen class

# ---- model ----------------------------------------------------------------------------------
TRUNK = "efficientnet_v2_s"  # trunk: "efficientnet_v2_s" (the study's), "resnet18", "resnet50", "convnext_tiny", "efficientnet_lite0" (ImageNet weights from pip: offline)
WEIGHTS = "auto"  # trunk weights: "auto" (ImageNet if cached, downloadable or pip-installed, else random + warning), "imagenet" (must load), a path to a .pth state dict, or None (random)
EMBEDDING_DIM = 128  # size of the embedding (second-to-last layer)
DROPOUT = 0.2  # dropout probability after the embedding layer

# ---- training -------------------------------------------------------------------------------
BATCH_SIZE = 64  # images per batch
LR = 0.0014  # Adam learning rate
MAX_EPOCHS = 50  # upper limit on epochs
PATIENCE = 8  # validation passes without a lower validation loss before early stopping
VAL_PER_EPOCH = 4  # validation passes per epoch (the study validated several times an epoch); 1 = at epoch end
CLASSWISE_TRAIN = "batches"  # class-wise training curves: "batches" (the batches trained on since the previous validation pass, their outputs in training mode: free) or "pass" (the model in eval mode over CLASSWISE_SAMPLES training images at each validation pass: a head pass each time)
CLASSWISE_SAMPLES = 5000  # CLASSWISE_TRAIN="pass" (and heads trained without cross-entropy): at most this many training images (a fixed random sample) at each validation pass
RESUME = True  # True: continue from checkpoints/last.pth after a kill; False: start training over
SEED = 0  # seeds random, numpy and torch; fixes the split, batches, dropout and UMAP; None = draw a fresh seed (printed)

# ---- rare classes, grouped splits -----------------------------------------------------------
CLASS_WEIGHTS = "none"  # weights of the cross-entropy per class: "none", "balanced" (n_images / (classes x images of the class), scikit-learn's) or "sqrt" (the square root of "balanced": milder)
BALANCED_SAMPLING = False  # True: each epoch draws as many training images as there are, with replacement, every class equally likely
MAX_PER_CLASS = None  # at most this many training images per class (a fixed random subset of each larger class); None = all
SELECT_BY = "auto"  # what picks best.pth among the validation passes: "auto" (the task's: validation loss; multilabel: validation mAP), "val_loss", "balanced_accuracy" or "macro_f1" (on the validation set)
GROUP_BY = None  # images of one group stay in one subset of the split: None (split image by image), "path:N" (the N-th folder of the image's path in the data folder; 1 = the class folder), "csv:<column>" (that column of GROUP_CSV) or "sample_id" (EcoTaxa's)
GROUP_CSV = None  # with GROUP_BY = "csv:<column>": a CSV with a "path" column (each image's path in the data folder) and that column

# ---- speed ----------------------------------------------------------------------------------
DEVICE = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda" or "cuda:1"
NUM_WORKERS = "auto"  # DataLoader worker processes; "auto" = 0 on <= 2 cores, else min(8, CPU cores - 1); 0 = load in the main process
CACHE_TRUNK = True  # compute the frozen trunk's output once per image and reuse it (disk cache)
CACHE_DTYPE = "float16"  # "float16" (half the disk) or "float32" (bit-for-bit as uncached)
MIXED_PRECISION = True  # bfloat16 autocast for the trunk on CUDA only; never used on CPU (slower there)
CHANNELS_LAST = True  # channels-last memory layout for the trunk's convolutions
DETERMINISTIC = False  # deterministic CUDA algorithms (slower on GPU); CPU runs are deterministic anyway

# ---- outputs --------------------------------------------------------------------------------
OUTPUT_DIR = "outputs"  # plots, tables, split file and embeddings
CHECKPOINT_DIR = "checkpoints"  # best.pth and last.pth
CACHE_DIR = "cache"  # trunk-feature cache, image-scan cache, numba's compiled code
COMPILE_AHEAD = True  # run_all.py: on a fresh numba cache, compile umap-learn's code in a low-priority background process while the first stages run
EXPORT_CSV = False  # also write the embeddings and UMAP coordinates as CSV (Parquet copies are always written)

# ---- analysis -------------------------------------------------------------------------------
DIMRED = "umap"  # dimensionality_reduction.py's 2-d plane: "umap" (umap-learn), "tsne" (scikit-learn's t-SNE, perplexity 30) or "pca" (scikit-learn's PCA)
UMAP_SAMPLES = 2000  # at most this many random samples from each of train, test and unseen (whichever DIMRED)
UMAP_NEIGHBORS = 15  # UMAP n_neighbors
DISTANCE_SAMPLES = 20000  # class-pair distances use at most this many random samples per class (exact below; cost grows with its square)
CLOSE_FAR_COUNT = 5  # images per row in the closest/furthest figures
CLOSE_FAR_SPACE = "embedding"  # distances to the class centre in "embedding" (128-d) or "umap" (the 2-d plane of DIMRED, as the study did with UMAP)
TRANSFER_TEST_FRACTION = 0.30  # share of each unseen class kept for testing the transfer classifiers
TRANSFER_REPEATS = 5  # random training subsets drawn per training-set size
TRANSFER_MAX_TRAIN = 5000  # largest training set of the transfer classifiers (an RBF SVC's cost grows with its square or more)
KNN_K = 10  # k of the kNN classifier

# ---- fine-tuning ----------------------------------------------------------------------------
FINETUNE_BLOCKS = 0  # last trunk blocks trained with the head (0 = frozen trunk, the study's main model); the trunk cache serves the blocks before them
FINETUNE_LR = 0.0001  # Adam learning rate of the fine-tuned trunk blocks (the head keeps LR)

# ---- evaluation extras: reproduction check, ranked images -----------------------------------
REPRO_TOLERANCE = 1e-4  # reproduce.py: largest absolute softmax-score difference allowed between saved and recomputed test scores
RANKED_CLASSES = []  # ranked_images.py: seen classes whose top/bottom-10 test images are shown; [] = every seen class
RANKED_AMONG = "class"  # rank a class's score among "class" (its own test images) or "all" (every test image)

# ---- training options and seed robustness ---------------------------------------------------
OPTIMIZER = "adam"  # "adam" (the study's), "adamw" (decoupled weight decay) or "sgd" (with MOMENTUM)
MOMENTUM = 0.9  # SGD momentum, from 0 to < 1; used only with OPTIMIZER = "sgd"
WEIGHT_DECAY = 0.0  # L2 penalty on the trained weights (adam, sgd) or decoupled decay (adamw); 0 = none
LR_SCHEDULE = "none"  # "none" (LR throughout), "step" (LR times LR_GAMMA every LR_STEP_EPOCHS epochs) or "cosine" (from LR to 0 over MAX_EPOCHS)
LR_STEP_EPOCHS = 5  # epochs between LR drops with LR_SCHEDULE = "step"
LR_GAMMA = 0.3  # factor applied to the LR at each drop with LR_SCHEDULE = "step"
COLOR_JITTER = 0.0  # brightness/contrast/saturation jitter of training images, from 0 (off) to 1; needs AUGMENT = True
LABEL_SMOOTHING = 0.0  # label smoothing of the training loss, from 0 (off) to < 1; the reported losses stay plain cross-entropy
SPLIT_SEED = None  # seed that draws the split; None = SEED (as before this setting). The split is drawn once per OUTPUT_DIR
SEEDS = [0, 1, 2, 3, 4]  # seeds.py: one training run per seed on the split in OUTPUT_DIR (at least 2 different seeds)

# ---- dataset overview -----------------------------------------------------------------------
OVERVIEW_SAMPLES = 8  # sample images per class in outputs/sample_images.png (dataset_overview.py)

# ---- feature maps ---------------------------------------------------------------------------
FEATURE_MODULES = "auto"  # modules whose outputs feature_maps.py hooks, named as in model.named_modules(), e.g. ["trunk.0", "head.0"]; "auto" = each trunk block and the head's convolutions
FEATURE_IMAGES = 200  # feature_maps.py: at most this many seen test images, and as many unseen images (or images of FEATURE_MAP_DIR)
FEATURE_MAP_DIR = None  # feature_maps.py: a folder of images (searched at any depth, e.g. another data set) measured instead of the run's test and unseen images; None = the run's own images

# ---- open-set detection, calibration, prediction --------------------------------------------
OPEN_SET_K = 10  # open_set.py: the kNN score is the distance to the k-th nearest training embedding
OPEN_SET_TRAIN_SAMPLES = 20000  # open_set.py, predict.py: the kNN score compares with at most this many random training embeddings (its cost grows with queries x these)
OPEN_SET_KNN_METRIC = "cosine"  # kNN score's distance: "cosine" (1 - cos, embeddings unit-normalised) or "euclidean"
PREDICT_DIR = None  # predict.py: folder of new unlabelled images (searched at any depth); None = no prediction (run_all skips predict)
PREDICT_SCORE = "knn"  # open-set score behind predict.py's unknown flag: "max_softmax", "energy", "knn" or "mahalanobis"
PREDICT_KEEP = 0.95  # share of the validation images (seen classes) kept as known: sets the unknown threshold, from > 0 to 1
PREDICT_EMBEDDINGS = False  # also write each new image's embedding (e0 ... e127) into predictions.csv
ROUTE_PRECISION = 0.9  # calibration.py, predict.py: per-class thresholds chosen on the validation images so that the "confident" predictions of each class reach this precision; the rest are "to review"
PREDICT_SAMPLES = 8  # predict.py's figure: at most this many images per predicted class and of those flagged unknown
DRIFT_ALPHA = 0.01  # predict.py's drift check of the new images against the held-out test images: its p-value level (Bonferroni over its tests); None = no check
DRIFT_SAMPLES = 2000  # predict.py's drift check: at most this many new images and as many test images, drawn at random (seeded)
PREDICT_BUNDLE = None  # predict.py: a model_bundle.pt (export_model.py) to predict with alone: no DATA_DIR, split or checkpoints needed; None = this run's best.pth and split. See docs/bundle.md
EXPORT_ONNX = False  # export_model.py: also write model_bundle/model.onnx (trunk + head -> logits and embeddings); needs pip install onnx onnxruntime
SAMPLE_BY = "folder"  # predict.py's abundance per sample: "folder" (each image's folder in PREDICT_DIR), "sample_id" (the EcoTaxa TSVs in PREDICT_DIR) or a CSV file with columns image, sample
ABUNDANCE_BOOTSTRAPS = 200  # predict.py: bootstrap draws behind each abundance interval (0 = no intervals)

# ---- embedding quality, leaks between splits, few-shot transfer, suspicious labels ----------
QUALITY_SAMPLES = 5000  # embedding_quality.py: at most this many random images per subset (silhouette and pair distances grow with its square)
QUALITY_TRUST_NEIGHBORS = 10  # embedding_quality.py: neighbours of the 2-d plane's trustworthiness (scikit-learn's n_neighbors; the plane of DIMRED)
LEAK_THRESHOLD = 0.005  # leaks.py: a val/test/unseen image whose cosine distance to a training image's pooled trunk features is at most this is a near-duplicate
LEAK_GRID = 4  # leaks.py: trunk feature maps are average-pooled to LEAK_GRID x LEAK_GRID cells before comparing (keeps the layout, drops pixel noise)
LEAK_FIGURE_PAIRS = 24  # leaks.py: at most this many pairs shown in outputs/leaks.png (closest first)
FEWSHOT_DRAWS = 10  # transfer_learning.py: random training sets of exactly k images per class drawn for each k
FEWSHOT_TEMPERATURE = 0.07  # transfer_learning.py: temperature T of the cosine-weighted kNN probe (votes weighted exp(cos / T), as DINO)
SUSPECT_FOLDS = 5  # suspicious_labels.py: folds of the out-of-fold class probabilities of the training images (fewer when a class has fewer training images)
SUSPECT_COUNT = 24  # suspicious_labels.py: the most suspicious training images shown in outputs/suspicious_labels.png

# ---- multi-label task -----------------------------------------------------------------------
TASK = "multiclass"  # "multiclass" (one class per image: class sub-folders, softmax) or "multilabel" (a label set per image from LABELS_CSV, sigmoid + BCE)
LABELS_CSV = None  # multilabel: CSV with columns path (relative to DATA_DIR) and labels (separated by ";"); None = <DATA_DIR>/labels.csv
BUILTIN_MULTILABEL_DIR = "data/digit_mosaics"  # multilabel with DATA_DIR = None: 2x2 mosaics of the built-in digits and their labels.csv (git-ignored)
TAIL_THRESHOLDS = 10  # evaluate.py: thresholds of the tail-accuracy curves, evenly from 0.5 to the highest test score

# ---- EcoTaxa --------------------------------------------------------------------------------
ECOTAXA_EXPORT = None  # an EcoTaxa export to train on instead of class folders: its .tsv file, a folder of .tsv files with their images, or EcoTaxa's .zip (unpacked into CACHE_DIR); None = DATA_DIR. See docs/ecotaxa.md
ECOTAXA_STATUSES = ["validated"]  # object_annotation_status values trained on, from "predicted", "validated", "dubious", "discarded"
ECOTAXA_MIN_COUNT = 10  # a class (an EcoTaxa category named in SEEN_CLASSES or UNSEEN_CLASSES) needs at least this many readable objects of ECOTAXA_STATUSES
ECOTAXA_IMPORT_ZIP = False  # predict.py: also write predictions/ecotaxa_import.zip (ecotaxa_import.tsv with the images), ready for EcoTaxa's import

# ---- head losses ----------------------------------------------------------------------------
HEAD_LOSS = "ce"  # what trains the head: "ce" (cross-entropy, the study's), "supcon", "triplet" (online mining), "arcface", or "ce+supcon", "ce+triplet", "ce+arcface" (cross-entropy + HEAD_LOSS_WEIGHT x that loss); without "ce" the classifier is the cosine nearest class mean of the training embeddings (ArcFace: its class weights)
HEAD_LOSS_WEIGHT = 1.0  # weight of the metric loss added to the cross-entropy in "ce+<loss>", > 0 and <= 100
HEAD_COMPARE_LOSSES = ["ce", "supcon", "triplet", "arcface", "ce+triplet"]  # compare_heads.py: one training run per HEAD_LOSS value listed
HEAD_COMPARE_EPOCHS = None  # compare_heads.py: MAX_EPOCHS of each run; None = MAX_EPOCHS

# ---- what to annotate next ------------------------------------------------------------------
ANNOTATE_STRATEGY = "diverse"  # annotate_next.py: how the batch is picked: "diverse" (margin, spread over the embeddings by weighted k-means), "margin" (near-ties of the top two classes), "entropy", "knn" (furthest from the labelled images) or "random"
ANNOTATE_BATCH = 50  # annotate_next.py: images picked for annotation (all candidates when fewer)
