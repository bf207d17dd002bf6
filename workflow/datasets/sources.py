"""Where every dataset comes from: its upstream files, their published checksums and sizes.

Pure data (no NumPy, no PIL): the planning module reads it to list every URL a download job
fetches (`snakemake -n download`) without importing the dataset modules, which read their
``FILES`` from here. Sources, layouts and licences: docs/data.md.
"""

from __future__ import annotations

from workflow.datasets import RemoteFile

__all__ = ["FILES", "ROADS_KINDS", "ROADS_SPLITS", "SR_SETS", "sr_hr_name"]

BAPPS_URL = "https://perceptual-similarity.s3.us-west-2.amazonaws.com/dataset/"
BAPPS = [
    RemoteFile(BAPPS_URL + "twoafc_train.tar.gz", extract=True, size=5_300_000_000,
               sha256="b4f5c772c7cd88ac44bcb4ff0741745d434c05f0094f2bfb262ddcd0055bf393"),
    RemoteFile(BAPPS_URL + "twoafc_val.tar.gz", extract=True, size=1_100_000_000,
               sha256="41486671b06de923e7ba277c4797d4d9d86d609863ba35ecdb576133f8b9d859"),
    # no published checksum: the downloader records the sha256 it saw
    RemoteFile(BAPPS_URL + "jnd.tar.gz", extract=True, size=200_000_000),
]

COCO_SIZE = 288  # prepared COCO images: short side resized to 288, centre crop (the study's)
COCO = [
    RemoteFile("http://images.cocodataset.org/zips/train2014.zip",
               sha256="ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
               size=13_510_573_713),
    RemoteFile("http://images.cocodataset.org/zips/val2014.zip",
               sha256="fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
               size=6_645_013_297),
]

SELFEXSR = "https://raw.githubusercontent.com/jbhuang0604/SelfExSR/master/data"
BSDS_URL = ("https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/bsds/"
            "BSDS300-images.tgz")
SR_SETS = {"Set5": 5, "Set14": 14}


def sr_hr_name(i: int) -> str:
    return f"img_{i:03d}_SRF_2_HR.png"


SR_TEST = [
    RemoteFile(f"{SELFEXSR}/{s}/image_SRF_2/{sr_hr_name(i)}", filename=f"{s}/{sr_hr_name(i)}")
    for s, n in SR_SETS.items() for i in range(1, n + 1)
] + [RemoteFile(BSDS_URL, extract=True)]

ROADS_URL = "https://www.cs.toronto.edu/~vmnih/data/mass_roads"
ROADS_SPLITS = ("train", "valid", "test")
ROADS_KINDS = {"sat": ".tiff", "map": ".tif"}
# the index pages; the tiles they link are fetched from there (no archive, no checksums)
ROADS = [
    RemoteFile(f"{ROADS_URL}/{split}/{kind}/", filename=f"{split}/{kind}/index.html")
    for split in ROADS_SPLITS for kind in ROADS_KINDS
]

# URLs and md5 exactly as torchvision's SVHN and STL10 classes declare them
SVHN = [
    RemoteFile("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
               md5="e26dedcc434d2e4c54c9b2d4a06d8373"),
    RemoteFile("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
               md5="eb5a983be6a315427106f1b164d9cef3"),
    RemoteFile("http://ufldl.stanford.edu/housenumbers/extra_32x32.mat",
               md5="a93ce644f1a588dc4d68dda5feec44a7"),
]
STL10 = [
    RemoteFile("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
               md5="91f7769df0f17e558f3565bffb0c7dfb", extract=True),
]
# the extracted files and their md5, exactly as torchvision.datasets.STL10 checks them
STL10_MEMBERS = {
    "train_X.bin": "918c2871b30a85fa023e0c44e0bee87f",
    "train_y.bin": "5a34089d4802c674881badbb80307741",
    "unlabeled_X.bin": "5242ba1fed5e4be9e1e742405eb56ca4",
    "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82",
    "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e",
}

# BAPPS's subsets (the folders of each split) and the parts of an item: folder -> suffix
BAPPS_2AFC_SUBSETS = {
    "val": ("traditional", "cnn", "superres", "deblur", "color", "frameinterp"),
    "train": ("traditional", "cnn", "mix"),
}
BAPPS_JND_SUBSETS = ("traditional", "cnn")
BAPPS_PARTS = {
    "2afc": {"ref": ".png", "p0": ".png", "p1": ".png", "judge": ".npy"},
    "jnd": {"p0": ".png", "p1": ".png", "same": ".npy"},
}

# The human-judgement datasets of the similarity family (docs/data.md). None publishes a
# checksum: the downloader records the sha256 it saw (pin one in data.<name>.checksums).
# TID2013: the authors' page (ponomarenko.info/tid2013.htm) links the RAR archive.
# size: about 908 MB per third-party READMEs, rounded up (only the free-disk check reads it)
TID2013 = [RemoteFile("http://www.ponomarenko.info/tid2013/tid2013.rar", extract=True,
                      size=1_000_000_000)]
# KADID-10k: the publishers' site (database.mmsp-kn.de/kadid-10k-database.html) links the zip.
# size: a third party's HEAD request (Content-Length 3,067,408,471); only the disk check reads it
KADID10K = [RemoteFile("https://datasets.vqa.mmsp-kn.de/archives/kadid10k.zip", extract=True,
                       size=3_067_408_471)]
# CSIQ: its host has moved several times and serves no stable archive: data.paths.csiq only.
CSIQ: list[RemoteFile] = []
# NIGHTS: what dataset/download_dataset.sh of ssundaram21/dreamsim fetches.
NIGHTS = [RemoteFile("https://data.csail.mit.edu/nights/nights.zip", extract=True)]

# CSIQ's distortion types as its DMOS workbook names them -> (folder under dst_imgs/, the
# token in the file name <image>.<token>.<level>.png)
CSIQ_TYPES = {"noise": ("awgn", "AWGN"), "jpeg": ("jpeg", "JPEG"),
              "jpeg 2000": ("jpeg2000", "jpeg2000"), "fnoise": ("fnoise", "fnoise"),
              "blur": ("blur", "BLUR"), "contrast": ("contrast", "contrast")}

FILES: dict[str, list[RemoteFile]] = {"bapps": BAPPS, "coco": COCO, "sr_test": SR_TEST,
                                      "roads": ROADS, "svhn": SVHN, "stl10": STL10,
                                      "tid2013": TID2013, "kadid10k": KADID10K, "csiq": CSIQ,
                                      "nights": NIGHTS}
