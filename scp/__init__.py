"""DICOM networking: the storage SCP, the SCU side, and the command line that wires the node."""
