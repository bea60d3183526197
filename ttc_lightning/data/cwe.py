"""Names of the CWEs common in PrimeVul, for prompts that list the allowed labels."""

from __future__ import annotations

# Short names as MITRE publishes them. The categories (189, 264, 310, 399) are retired as mapping targets
# but PrimeVul still labels many functions with them, as NVD did when the CVEs were filed.
CWE_NAMES: dict[str, str] = {
    "CWE-20": "Improper Input Validation",
    "CWE-22": "Path Traversal",
    "CWE-59": "Improper Link Resolution Before File Access",
    "CWE-78": "OS Command Injection",
    "CWE-94": "Code Injection",
    "CWE-119": "Improper Restriction of Operations within the Bounds of a Memory Buffer",
    "CWE-120": "Buffer Copy without Checking Size of Input",
    "CWE-122": "Heap-based Buffer Overflow",
    "CWE-125": "Out-of-bounds Read",
    "CWE-129": "Improper Validation of Array Index",
    "CWE-131": "Incorrect Calculation of Buffer Size",
    "CWE-134": "Use of Externally-Controlled Format String",
    "CWE-189": "Numeric Errors",
    "CWE-190": "Integer Overflow or Wraparound",
    "CWE-191": "Integer Underflow",
    "CWE-193": "Off-by-one Error",
    "CWE-200": "Exposure of Sensitive Information to an Unauthorized Actor",
    "CWE-252": "Unchecked Return Value",
    "CWE-264": "Permissions, Privileges, and Access Controls",
    "CWE-269": "Improper Privilege Management",
    "CWE-284": "Improper Access Control",
    "CWE-287": "Improper Authentication",
    "CWE-295": "Improper Certificate Validation",
    "CWE-310": "Cryptographic Issues",
    "CWE-362": "Race Condition",
    "CWE-369": "Divide By Zero",
    "CWE-399": "Resource Management Errors",
    "CWE-400": "Uncontrolled Resource Consumption",
    "CWE-401": "Missing Release of Memory after Effective Lifetime",
    "CWE-404": "Improper Resource Shutdown or Release",
    "CWE-415": "Double Free",
    "CWE-416": "Use After Free",
    "CWE-457": "Use of Uninitialized Variable",
    "CWE-476": "NULL Pointer Dereference",
    "CWE-611": "Improper Restriction of XML External Entity Reference",
    "CWE-617": "Reachable Assertion",
    "CWE-665": "Improper Initialization",
    "CWE-674": "Uncontrolled Recursion",
    "CWE-681": "Incorrect Conversion between Numeric Types",
    "CWE-682": "Incorrect Calculation",
    "CWE-703": "Improper Check or Handling of Exceptional Conditions",
    "CWE-754": "Improper Check for Unusual or Exceptional Conditions",
    "CWE-755": "Improper Handling of Exceptional Conditions",
    "CWE-763": "Release of Invalid Pointer or Reference",
    "CWE-770": "Allocation of Resources Without Limits or Throttling",
    "CWE-772": "Missing Release of Resource after Effective Lifetime",
    "CWE-787": "Out-of-bounds Write",
    "CWE-824": "Access of Uninitialized Pointer",
    "CWE-834": "Excessive Iteration",
    "CWE-835": "Infinite Loop",
    "CWE-843": "Type Confusion",
    "CWE-862": "Missing Authorization",
    "CWE-863": "Incorrect Authorization",
    "CWE-908": "Use of Uninitialized Resource",
    "CWE-909": "Missing Initialization of Resource",
    "NVD-CWE-Other": "Other (no specific CWE assigned)",
    "NVD-CWE-noinfo": "Insufficient Information",
}


def is_cwe_id(label: str) -> bool:
    """True for a concrete weakness id such as `CWE-787` (not NVD's `NVD-CWE-Other` placeholders)."""
    prefix, _, number = label.partition("-")
    return prefix == "CWE" and number.isdigit()


def describe_cwe(cwe_id: str) -> str:
    """`CWE-787 (Out-of-bounds Write)`, or the bare id when the table does not know it."""
    name = CWE_NAMES.get(cwe_id)
    return f"{cwe_id} ({name})" if name else cwe_id
