"""Results back to the patient's record: DICOM Segmentation and Structured Report per ok scan.

``seg.py`` builds the Segmentation (lung, sides, lobes, the voxels below -950 HU) on the source
series' geometry, ``sr.py`` the TID 1500 measurement report that references it, ``identity.py``
replaces source identity for ``--pseudonymize``, ``run.py`` does it for every ok scan of a run
(``emphy export OUT --dicom DIR --stow URL``).
"""
