-- Send every stable study that did not come from ainode (its own SRs) to ainode for analysis.
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for _, s in ipairs(series) do
    if s['MainDicomTags']['Modality'] ~= 'SR' then
      RestApiPost('/modalities/ainode/store', studyId)
      return
    end
  end
end
